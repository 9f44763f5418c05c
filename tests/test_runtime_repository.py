"""Model repository: loading, grouping, sidecar-only models, contract/graph checks, no torch."""

import json
import subprocess
import sys

import numpy as np
import pytest
from onnx_fixtures import CHARS, build_rnn, build_zoo, reference, reference_external

from rnnzoo.contract import sidecar_path
from rnnzoo.errors import InvalidArgument, NotFound
from rnnzoo.ort_options import session_options
from rnnzoo.server.runtime import ModelRepository


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    return d, build_zoo(d)


def test_loads_every_model_and_groups_seq2seq(zoo):
    d, _ = zoo
    repo = ModelRepository.from_dir(d)
    names = [m.name for m in repo.list()]
    assert names == ["bigru", "charlm", "gru", "kws", "lstm2", "rev", "rnn"]
    rev = repo.get("rev")
    assert rev.is_seq2seq and set(rev.graphs) == {"encoder", "decoder"}
    assert rev.info.task == "seq2seq" and set(rev.info.contracts) == {"encoder", "decoder"}
    assert repo.get("bigru").info.streamable is False
    assert repo.get("lstm2").info.streamable is True
    with pytest.raises(NotFound, match=r"no model 'nope'; known models: \['bigru'"):
        repo.get("nope")


@pytest.mark.parametrize("name", ["lstm2", "gru", "rnn", "bigru", "charlm"])
def test_run_matches_numpy_reference(zoo, name):
    d, refs = zoo
    m = refs[name]
    graph = ModelRepository.from_dir(d).get(name).graphs["model"]
    rng = np.random.default_rng(7)
    if m["emb"] is not None:
        x = rng.integers(0, len(CHARS), (3, 6)).astype(np.int64)
        feeds = {"tokens": x}
    else:
        x = rng.normal(size=(3, 6, 3)).astype(np.float32)
        feeds = {"x": x}
    states = graph.initial_batch_state(3)
    outs, nxt = graph.run(feeds, states)
    want, want_states = reference(m, x)
    name_out = graph.contract.outputs[0].name
    np.testing.assert_allclose(outs[name_out], want, atol=1e-5)
    np.testing.assert_allclose(nxt["h0"], want_states["hn"], atol=1e-5)
    if "cn" in want_states:
        np.testing.assert_allclose(nxt["c0"], want_states["cn"], atol=1e-5)


def test_sidecar_only_model_uses_its_layout_init_value_and_constant(zoo):
    d, refs = zoo
    graph = ModelRepository.from_dir(d).get("kws").graphs["model"]
    st = graph.contract.states[0]
    assert (st.input, st.output, st.batch_axis) == ("state_in", "state_out", 0)
    assert graph.init_states["state_in"].shape == (1, 1, 5)
    assert np.all(graph.init_states["state_in"] == 0.25)
    assert graph.constants["sample_rate"] == 8000
    x = np.random.default_rng(3).normal(size=(2, 4, 4)).astype(np.float32)
    outs, nxt = graph.run({"features": x}, graph.initial_batch_state(2))
    want, want_state = reference_external(refs["kws"], x)
    np.testing.assert_allclose(outs["scores"], want, atol=1e-5)
    np.testing.assert_allclose(nxt["state_in"], want_state, atol=1e-5)


def test_contract_graph_mismatch_names_file_and_fix(tmp_path):
    p = tmp_path / "m.onnx"
    build_rnn(p, cell="gru")
    side = sidecar_path(p)
    from rnnzoo.contract import read_contract

    data = json.loads(read_contract(p).to_json())
    data["inputs"][0]["dtype"] = "float64"
    data["states"][0]["shape"] = [1, "batch", 8, 1]
    side.write_text(json.dumps(data))
    with pytest.raises(InvalidArgument) as err:
        ModelRepository.from_dir(tmp_path)
    msg = str(err.value)
    assert str(p) in msg and "fix the contract" in msg
    assert "contract dtype float64, graph float32" in msg
    assert "contract rank 4" in msg


def test_undeclared_graph_input_is_reported(tmp_path):
    p = tmp_path / "m.onnx"
    build_rnn(p, cell="gru")
    from rnnzoo.contract import read_contract

    data = json.loads(read_contract(p).to_json())
    data["states"] = []
    sidecar_path(p).write_text(json.dumps(data))
    with pytest.raises(InvalidArgument, match=r"graph input 'h0' is not declared"):
        ModelRepository.from_dir(tmp_path)


def test_file_without_contract_fails_the_load_by_name(tmp_path):
    build_rnn(tmp_path / "good.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(InvalidArgument, match=r"junk\.onnx"):
        ModelRepository.from_dir(tmp_path)


def test_seq2seq_half_without_partner_is_reported(tmp_path):
    build_rnn(
        tmp_path / "t.encoder.onnx",
        vocab=CHARS,
        output_size=0,
        name="t.encoder",
        task="seq2seq",
        role="encoder",
        group="t",
    )
    with pytest.raises(InvalidArgument, match=r"group 't' has no decoder"):
        ModelRepository.from_dir(tmp_path)


def test_missing_or_empty_dir_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        ModelRepository.from_dir(tmp_path / "nothing")
    with pytest.raises(NotFound, match=r"no \.onnx files"):
        ModelRepository.from_dir(tmp_path)


def test_session_options_for_step_serving():
    so = session_options()
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_runtime_imports_neither_torch_nor_grpc():
    code = (
        "import sys, rnnzoo.server.runtime, rnnzoo.server.runtime.runtime;"
        "bad = [m for m in ('torch', 'grpc') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- parity records: a model whose recorded parity failed is not served by default ----------
def _record(d, name, files, ok, summary="FAIL m whole B=1 T=1000 hn: max abs 2.5e-05"):
    from rnnzoo import parity_record

    rec = parity_record.make_record(name, ok=ok, summary=summary, files=files)
    return parity_record.write_record(parity_record.record_path(d, name), rec)


def test_a_model_whose_recorded_parity_failed_is_refused_unless_allowed(tmp_path, caplog):
    from rnnzoo.errors import FailedPrecondition
    from rnnzoo.server.runtime import Runtime
    from rnnzoo.server.runtime.repository import LoadOptions

    build_rnn(tmp_path / "m.onnx", name="m")
    build_rnn(tmp_path / "good.onnx", name="good", seed=3)
    _record(tmp_path, "m", [tmp_path / "m.onnx"], ok=False)
    _record(tmp_path, "good", [tmp_path / "good.onnx"], ok=True)
    with pytest.raises(FailedPrecondition) as err:
        ModelRepository.from_dir(tmp_path)
    msg = str(err.value)
    assert "m.onnx" in msg and "m.parity.json" in msg and "max abs 2.5e-05" in msg
    assert "rnnzoo zoo build --only m" in msg and "--allow-failed-parity" in msg
    assert "good.onnx" not in msg  # the passing one is not blamed
    with caplog.at_level("WARNING"):
        repo = ModelRepository.from_dir(tmp_path, allow_failed_parity=True)
    assert [m.name for m in repo.list()] == ["good", "m"]
    assert any("m.parity.json" in r.getMessage() for r in caplog.records)
    # `rnnzoo serve --allow-failed-parity` passes it down, as LoadOptions
    rt = Runtime.from_dir(tmp_path, load=LoadOptions(allow_failed_parity=True))
    assert len(rt.repo.list()) == 2


def test_a_parity_record_for_other_bytes_is_not_trusted(tmp_path):
    from rnnzoo.errors import FailedPrecondition

    build_rnn(tmp_path / "m.onnx", name="m")
    _record(tmp_path, "m", [tmp_path / "m.onnx"], ok=True)
    assert [m.name for m in ModelRepository.from_dir(tmp_path).list()] == ["m"]
    build_rnn(tmp_path / "m.onnx", name="m", seed=5)  # replaced after it was verified
    with pytest.raises(FailedPrecondition, match=r"judged other bytes .*unverified"):
        ModelRepository.from_dir(tmp_path)
    assert ModelRepository.from_dir(tmp_path, allow_failed_parity=True).get("m")
    # A record of an older format (no file hashes) vouches for nothing either.
    (tmp_path / "m.parity.json").write_text(json.dumps({"ok": True, "cases": []}))
    with pytest.raises(FailedPrecondition, match=r"not an rnnzoo\.parity/1 record"):
        ModelRepository.from_dir(tmp_path)
    # No record at all: a model exported elsewhere, served as before.
    (tmp_path / "m.parity.json").unlink()
    assert ModelRepository.from_dir(tmp_path).get("m")


def test_a_seq2seq_pair_is_judged_by_its_group_record(tmp_path):
    from onnx_fixtures import build_seq2seq

    from rnnzoo.errors import FailedPrecondition

    build_seq2seq(tmp_path, "rev")
    pair = [tmp_path / "rev.encoder.onnx", tmp_path / "rev.decoder.onnx"]
    _record(tmp_path, "rev", pair, ok=True)
    assert ModelRepository.from_dir(tmp_path).get("rev").is_seq2seq
    _record(tmp_path, "rev", pair, ok=False)
    with pytest.raises(FailedPrecondition) as err:
        ModelRepository.from_dir(tmp_path)
    assert "rev.encoder.onnx" in str(err.value) and "rev.decoder.onnx" in str(err.value)


def test_hidden_folders_such_as_the_build_staging_are_not_scanned(tmp_path):
    (tmp_path / "m").mkdir()
    build_rnn(tmp_path / "m" / "m.onnx", name="m")
    (tmp_path / "m" / ".staging").mkdir()
    (tmp_path / "m" / ".staging" / "m.onnx").write_bytes(b"an unverified export")
    assert [m.name for m in ModelRepository.from_dir(tmp_path).list()] == ["m"]
