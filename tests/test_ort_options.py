"""The direct ORT call the server makes (``run_fn``) is ``InferenceSession.run`` minus the
wrapper's checks: same results, and a bad feed still fails."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx_fixtures import build_rnn

from rnnzoo.ort_options import run_fn, session_options


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def _feed(i: ort.NodeArg, rng) -> np.ndarray:
    shape = [d if isinstance(d, int) else 3 for d in i.shape]
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_direct_call_returns_what_session_run_returns(tmp_path, cell):
    build_rnn(tmp_path / "m.onnx", cell=cell, layers=2)
    sess = _session(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    feeds = {i.name: _feed(i, rng) for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    want = sess.run(names, feeds)
    got = run_fn(sess)(names, feeds)
    assert len(got) == len(want) == len(names)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_direct_call_still_fails_on_a_missing_feed(tmp_path):
    build_rnn(tmp_path / "m.onnx", cell="gru")
    sess = _session(tmp_path / "m.onnx")
    first = sess.get_inputs()[0]
    feeds = {first.name: _feed(first, np.random.default_rng(0))}
    with pytest.raises(Exception, match=r"(?i)missing|input"):
        run_fn(sess)([o.name for o in sess.get_outputs()], feeds)


def test_a_session_without_the_inner_object_falls_back_to_run():
    class Wrapped:  # what another ORT version might look like: run() only
        def run(self, names, feeds):
            return ["via run", names, feeds]

    assert run_fn(Wrapped())(["y"], {"x": 1}) == ["via run", ["y"], {"x": 1}]
