"""``rnnzoo contract init`` / ``check``: guessed sidecars for every zoo-like graph and the docs'
examples, placeholders refused until set, wrong fields named, the same probe at load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from contract_examples import build_kws, build_vad, doc_example
from onnx_fixtures import build_zoo

from rnnzoo.cli import main
from rnnzoo.contract import read_contract, sidecar_path
from rnnzoo.contract_cli import check, guess
from rnnzoo.errors import InvalidArgument
from rnnzoo.server.runtime import ModelRepository


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """name -> (path, the contract the graph was built with); no sidecars left beside them."""
    d = tmp_path_factory.mktemp("init")
    build_zoo(d)
    build_vad(d / "vad.onnx", doc_example("vad-example"), sidecar=False)
    build_kws(d / "kws-gru.onnx", doc_example("kws-example"), sidecar=False)
    out = {}
    for f in sorted(d.glob("*.onnx")):
        if f.stem in ("vad", "kws-gru"):
            tag = "vad-example" if f.stem == "vad" else "kws-example"
            from rnnzoo.contract import Contract

            truth = Contract.from_dict(doc_example(tag))
        else:
            truth = read_contract(f)
        sidecar_path(f).unlink(missing_ok=True)
        out[f.name.removesuffix(".onnx")] = (f, truth)
    return out


def test_init_pairs_the_states_of_every_zoo_graph_and_the_examples(graphs):
    assert {
        "lstm2",
        "gru",
        "rnn",
        "bigru",
        "charlm",
        "rev.encoder",
        "rev.decoder",
        "kws",
        "vad",
        "kws-gru",
    } <= set(graphs)
    for name, (path, truth) in graphs.items():
        c, guessed, _ = guess(path)
        got = [(s["input"], s["output"], s["batch_axis"]) for s in c["states"]]
        want = [(s.input, s.output, s.batch_axis) for s in truth.states]
        assert got == want, (name, guessed)
        assert [i["name"] for i in c["inputs"]] == [i.name for i in truth.inputs], name
        for g, t in zip(c["inputs"] + c["outputs"], truth.inputs + truth.outputs, strict=True):
            assert (g["batch_axis"], g["time_axis"]) == (t.batch_axis, t.time_axis), (name, g)
        assert [k["name"] for k in c["constants"]] == [k.name for k in truth.constants], name


def test_init_writes_a_sidecar_the_server_refuses_until_the_constant_is_set(
    graphs, capsys, tmp_path
):
    path, _ = graphs["kws"]
    assert main(["contract", "init", str(path)]) == 0
    out = capsys.readouterr().out
    assert "state state_in -> state_out" in out and "batch_axis=0" in out
    assert "set the value of 'sample_rate'" in out
    assert main(["contract", "init", str(path)]) == 2  # no overwrite without --force
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["contract", "check", str(path)]) == 1
    assert "constants[0].value: not set" in capsys.readouterr().out
    side = sidecar_path(path)
    data = json.loads(side.read_text())
    data["constants"][0]["value"] = 8000
    side.write_text(json.dumps(data))
    assert check(path) == []
    assert main(["contract", "check", str(path)]) == 0
    # a wrong state batch axis: named by check, and the load fails the same way
    data["states"][0]["shape"] = [1, "batch", 5]
    data["states"][0]["batch_axis"] = 1
    side.write_text(json.dumps(data))
    problems = check(path)
    assert problems and problems[0].startswith("states[0].batch_axis: declared 1")
    shutil.copy(path, tmp_path / path.name)
    shutil.copy(side, sidecar_path(tmp_path / path.name))
    with pytest.raises(InvalidArgument, match=r"states\[0\]\.batch_axis: declared 1"):
        ModelRepository.from_dir(tmp_path, strict=True)
    side.unlink()


def test_init_finds_the_lengths_a_strided_graph_takes_and_check_explains_one_without(graphs):
    path, _ = graphs["vad"]
    main(["contract", "init", str(path), "--force"])
    side = sidecar_path(path)
    data = json.loads(side.read_text())
    # kernel 128, stride 64: the probe ran 128, 256, ... 4096 samples and not 1 ... 64
    assert data["chunk"] == {"multiple_of": 128} and data["format"] == "rnnzoo.contract/2"
    assert check(path) == []
    del data["chunk"]
    side.write_text(json.dumps(data))
    problems = check(path)
    assert len(problems) == 1 and "declare chunk" in problems[0] and "context_steps" in problems[0]
    data["inputs"][0]["context_steps"] = 64  # the docs' declaration: what init cannot see
    data["chunk"] = {"steps": 512}
    side.write_text(json.dumps(data))
    assert check(path) == []
    side.unlink()


def test_contract_cli_needs_no_torch(graphs):
    path, _ = graphs["gru"]
    code = (
        "import sys; from rnnzoo.cli import main; "
        f"rc = main(['contract', 'check', {str(path)!r}]); "
        "sys.exit(rc or ('torch' in sys.modules) * 3)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _unnamed_time_major(src, dst):
    """The kws graph as another tool might write it: a time-major input ``frames (T, B, 40)``,
    no dim names anywhere and the outputs' shapes unknown (as in Silero VAD's ``stateN``)."""
    import onnx
    from onnx import helper

    m = onnx.load(str(src))
    g = m.graph
    g.node.insert(0, helper.make_node("Transpose", ["frames"], ["features"], perm=[1, 0, 2]))
    frames = helper.make_tensor_value_info("frames", onnx.TensorProto.FLOAT, [None, None, 40])
    feats = next(i for i in g.input if i.name == "features")
    g.input.remove(feats)
    g.input.insert(0, frames)
    for v in g.input:
        for d in v.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.Clear()
    for v in g.output:
        shape = v.type.tensor_type.shape
        rank = len(shape.dim)
        shape.ClearField("dim")
        for _ in range(rank):
            shape.dim.add()
    onnx.save(m, str(dst))


def test_init_pairs_a_state_whose_output_shape_is_unknown_and_runs_the_graph_for_its_axes(
    graphs, tmp_path, capsys
):
    path = tmp_path / "kws-tm.onnx"
    _unnamed_time_major(graphs["kws-gru"][0], path)
    c, guessed, _ = guess(path)
    assert [(s["input"], s["output"], s["batch_axis"], s["shape"]) for s in c["states"]] == [
        ("state_in", "state_out", 0, ["batch", 1, 64])
    ]
    # no dim names: only running the graph tells (time, batch) from (batch, time)
    assert [(i["name"], i["batch_axis"], i["time_axis"]) for i in c["inputs"]] == [("frames", 1, 0)]
    assert [(o["name"], o["batch_axis"], o["time_axis"]) for o in c["outputs"]] == [
        ("scores", 0, 1)
    ]
    assert "chunk" not in c and c["format"] == "rnnzoo.contract/1"  # any length runs
    assert any("by a probe run" in g for g in guessed)
    assert main(["contract", "init", str(path), "--set", "sample_rate=16000"]) == 0
    assert json.loads(sidecar_path(path).read_text())["constants"][0]["value"] == 16000
    assert check(path) == []


def test_the_chunk_rule_comes_from_the_lengths_that_ran():
    from rnnzoo.contract_probe import LENGTHS, _chunk_rule

    assert _chunk_rule(list(LENGTHS)) is None
    assert _chunk_rule([t for t in LENGTHS if t % 4 == 0]) == {"multiple_of": 4}
    assert _chunk_rule([256, 512]) == {"steps": 512}  # Silero at 16 kHz: one window
    assert _chunk_rule([3]) == {"steps": 3}


def test_contract_init_and_check_answer_bad_files_and_options_without_a_traceback(
    graphs, tmp_path, capsys
):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not a model at all\xff" * 10)
    assert main(["contract", "init", str(junk)]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    assert main(["contract", "check", str(junk)]) == 1
    assert "junk.onnx" in capsys.readouterr().out
    assert main(["contract", "check", str(tmp_path / "missing.onnx")]) == 1
    assert "no such file" in capsys.readouterr().out
    path = tmp_path / "kws.onnx"
    shutil.copy(graphs["kws"][0], path)
    assert main(["contract", "init", str(path), "--set", "rate=8000"]) == 2
    assert "the graph has no input 'rate'" in capsys.readouterr().err
    assert main(["contract", "init", str(path), "--set", "sample_rate"]) == 2
    assert "write NAME=VALUE" in capsys.readouterr().err
    assert main(["contract", "init", str(path), "--set", "sample_rate=fast"]) == 2
    assert "a number or a JSON list" in capsys.readouterr().err
    assert main(["contract", "init", str(path), "--set", 'sample_rate=[1, "a"]']) == 2
    assert "not a value of dtype int64 for input 'sample_rate'" in capsys.readouterr().err
    sidecar_path(path).write_text("{not json")
    assert main(["contract", "check", str(path)]) == 1
    assert "problem" in capsys.readouterr().out
