"""Session state as data (snapshot, restore, fork) and position-based deduplication, over
real servers (BackgroundServer) and the real client."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from onnx_fixtures import build_rnn

from rnnzoo.client import Client, RpcError
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.server.runtime import Runtime, RuntimeOptions
from rnnzoo.server.transport import BackgroundServer

EXACT = 1e-6


def _x(steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, 3)).astype(np.float32)


def _server(d, **kw):
    opts = RuntimeOptions(session_ttl_s=None, **kw)
    return BackgroundServer(lambda: Runtime.from_dir(d, opts))


@pytest.fixture(scope="module")
def two(zoo):
    with (
        _server(zoo) as a,
        _server(zoo) as b,
        Client(a.target, timeout=20) as ca,
        Client(b.target, timeout=20) as cb,
    ):
        yield ca, cb


def test_fork_diverges_independently_and_exactly(two):
    c, _ = two
    x, y1, y2 = _x(6, 1), _x(4, 2), _x(4, 3)
    with c.session("lstm2") as s:
        s.step(x)
        with s.fork() as f:
            a = s.step(y1)
            b = f.step(y2)
            assert a.start == b.start == 6
        ref_a = c.infer("lstm2", np.concatenate([x, y1])[None])["y"][0][6:]
        ref_b = c.infer("lstm2", np.concatenate([x, y2])[None])["y"][0][6:]
        np.testing.assert_allclose(a["y"], ref_a, atol=EXACT)
        np.testing.assert_allclose(b["y"], ref_b, atol=EXACT)
        # the fork changed nothing in the original
        more = s.step(y2)
        ref = c.infer("lstm2", np.concatenate([x, y1, y2])[None])["y"][0][10:]
        np.testing.assert_allclose(more["y"], ref, atol=EXACT)


def test_snapshot_on_one_server_restores_on_another_exactly(two):
    ca, cb = two
    x = _x(20, 4)
    reference = ca.infer("lstm2", x[None])["y"][0]
    with ca.session("lstm2") as s:
        first = s.step(x[:12])
        snap = s.snapshot()
    assert snap.model == "lstm2" and snap.steps == 12 and len(snap.model_hash) == 64
    assert set(snap.state) == {"h0", "c0"}
    blob = snap.SerializeToString()
    with cb.restore(blob) as r:
        rest = r.step(x[12:])
    assert rest.start == 12 and rest.steps_total == 20
    got = np.concatenate([first["y"], rest["y"]])
    np.testing.assert_allclose(got, reference, atol=EXACT)


def test_bidirectional_snapshot_carries_the_buffered_prefix(two):
    ca, cb = two
    x = _x(7, 5)
    with ca.session("bigru") as s:
        s.step(x[:3])
        s.step(x[3:5])
        snap = s.snapshot()
    assert len(snap.buffer) == 2 and snap.steps == 5
    with cb.restore(snap) as r:
        out = r.step(x[5:])
    assert out.revised and out.start == 0 and out.steps_total == 7
    ref = ca.infer("bigru", x[None])
    for name, v in out.outputs.items():
        np.testing.assert_allclose(v, ref[name][0], atol=EXACT)


def test_snapshot_of_another_model_version_is_refused(two, tmp_path):
    ca, _ = two
    other = tmp_path / "other"
    other.mkdir()
    build_rnn(other / "lstm2.onnx", cell="lstm", layers=2, seed=99)  # other weights
    with ca.session("lstm2") as s:
        s.step(_x(3, 6))
        snap = s.snapshot()
    with _server(other) as srv, Client(srv.target) as c, pytest.raises(RpcError) as info:
        c.restore(snap)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert snap.model_hash[:16] in info.value.details()


def test_forks_count_against_capacity(zoo):
    with _server(zoo, max_sessions=2) as srv, Client(srv.target) as c:
        s = c.session("gru")
        s.fork()
        with pytest.raises(RpcError) as info:
            s.fork()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_resent_chunk_gets_the_same_answer_and_a_gap_is_refused(two):
    c, _ = two
    x = _x(5, 7)
    with c.session("gru") as s:
        s.step(x[:2])
        reqs = [
            c._request("gru", s.id, 10, x[2:4], position=2),
            c._request("gru", s.id, 11, x[2:4], position=2),  # a retry of the same chunk
        ]
        s.detach()
        a, b = list(c.stub.Stream(iter(reqs)))
        assert a.steps_total == b.steps_total == 4 and b.request_id == 11
        assert a.outputs["y"].data == b.outputs["y"].data
        gap = c._request("gru", s.id, 12, x[4:], position=7)
        with pytest.raises(grpc.RpcError) as info:
            list(c.stub.Stream(iter([gap])))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "position 4" in info.value.details()
        # Infer(advance) deduplicates the same way
        req = pb.InferRequest(model="gru", session_id=s.id, advance=True, position=4)
        req.inputs["x"].CopyFrom(c._request("gru", s.id, 0, x[4:][None]).inputs["x"])
        r1 = c.stub.Infer(req)
        r2 = c.stub.Infer(req)
        assert r1 == r2
        s.position = 5  # this handle did not see the raw calls above
        assert s.step(x[:1]).start == 5  # applied once
