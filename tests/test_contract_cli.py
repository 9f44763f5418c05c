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


def test_check_explains_a_graph_that_needs_context_and_passes_once_declared(graphs):
    path, _ = graphs["vad"]
    main(["contract", "init", str(path), "--force"])
    problems = check(path)
    assert len(problems) == 1 and "declare chunk" in problems[0] and "context_steps" in problems[0]
    side = sidecar_path(path)
    data = json.loads(side.read_text())
    data["format"] = "rnnzoo.contract/2"
    data["inputs"][0]["context_steps"] = 64
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
