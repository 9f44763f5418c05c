"""`rnnzoo export` / `rnnzoo verify` end to end: parity grid, failures listed, clear errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rnnzoo.cli import main
from rnnzoo.errors import FailedPrecondition
from rnnzoo.export.cli import export_checkpoint
from rnnzoo.export.onnx_export import export_model
from rnnzoo.export.verify import BATCHES, TIMES, verify_file, verify_net
from rnnzoo.models.rnn import RecurrentNet, RNNConfig, Seq2Seq, Seq2SeqConfig


def save_ckpt(path, model, name, task, family="rnn"):
    """A checkpoint in the docs/design.md format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": "rnnzoo.checkpoint/1",
        "name": name,
        "family": family,
        "config": model.cfg.to_dict(),
        "task": task,
        "state_dict": model.state_dict(),
        "metrics": {},
        "train": {"seed": 0},
    }
    torch.save(ckpt, path)
    return path


@pytest.fixture
def lm_ckpt(tmp_path):
    torch.manual_seed(0)
    net = RecurrentNet(RNNConfig(cell="lstm", hidden_size=8, vocab_size=6, output_size=6))
    task = {"name": "chars", "kind": "lm", "vocab": list("abcdef")}
    return save_ckpt(tmp_path / "zoo" / "chars" / "model.pt", net, "chars", task)


def test_cli_export_and_verify_pass(lm_ckpt, capsys):
    assert main(["export", str(lm_ckpt)]) == 0
    onnx_path = lm_ckpt.parent / "chars.onnx"
    assert capsys.readouterr().out.split() == [str(onnx_path)]
    assert main(["verify", str(onnx_path), "--quick", "--json"]) == 0  # checkpoint found
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["failures"] == []
    assert {c["tensor"] for c in report["cases"]} == {"logits", "hn", "cn"}
    assert {c["mode"] for c in report["cases"]} >= {"whole", "stream/chunk1", "stream/chunk7"}
    assert max(c["max_abs"] for c in report["cases"]) < 1e-5


def test_export_by_zoo_name(lm_ckpt, monkeypatch, capsys):
    monkeypatch.setenv("RNNZOO_ZOO_DIR", str(lm_ckpt.parent.parent))
    out = lm_ckpt.parent.parent / "served"
    assert main(["export", "chars", "--out", str(out)]) == 0
    assert (out / "chars.onnx").is_file()
    assert main(["export", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "rnnzoo train no-such-model" in err and "Traceback" not in err


def test_broken_graph_fails_listing_every_case(lm_ckpt, tmp_path, capsys):
    [path] = export_checkpoint(lm_ckpt, tmp_path / "bad.onnx")
    model = onnx.load(str(path))
    # Nudge the head's bias: the graph still loads and runs, but is wrong by ~1e-3.
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.shape == (6,):
            init.CopyFrom(numpy_helper.from_array(arr + 1e-3, init.name))
            break
    else:
        pytest.fail("no head bias initializer found")
    onnx.save(model, str(path))
    report, _ = verify_file(path, lm_ckpt, times=(1, 7), batches=(1, 3), stream=(20, 2))
    assert not report.ok
    failing = {(c.mode, c.batch, c.time, c.tensor) for c in report.failures}
    assert ("whole", 1, 1, "logits") in failing and ("stream/chunk1", 2, 20, "logits") in failing
    assert ("step1", 1, 0, "logits") in failing and ("step8", 3, 7, "logits") in failing
    assert all(abs(c.max_abs - 1e-3) < 1e-4 for c in report.failures)
    assert all(c.tensor == "logits" for c in report.failures)  # states untouched
    assert main(["verify", str(path), "--checkpoint", str(lm_ckpt), "--quick"]) == 1
    out = capsys.readouterr()
    # --quick: T in (1, 2, 7, 64) x B in (1, 3), every case failing on logits only: whole
    # (8), chunked at T=64 (3 chunkings) and per-step (1 and 8 steps from T=0 and each T).
    assert out.out.count("FAIL ") == 4 * 2 + 3 + 2 * 5 * 2
    assert out.out.count("FAIL chars step1 ") == 2 * 5
    assert "parity comparisons exceed" in out.err


def test_checkpoint_mismatch_and_bad_files_are_clear_errors(lm_ckpt, tmp_path, capsys):
    [path] = export_checkpoint(lm_ckpt, tmp_path / "m.onnx")
    other = RecurrentNet(RNNConfig(cell="lstm", hidden_size=8, vocab_size=6, output_size=6))
    other_ckpt = save_ckpt(tmp_path / "other.pt", other, "chars", {"kind": "lm"})
    with pytest.raises(FailedPrecondition, match="sha256"):
        verify_file(path, other_ckpt)
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(path.read_bytes()[:200])
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("hello")
    for argv in (
        ["verify", str(path), "--checkpoint", str(other_ckpt)],
        ["verify", str(truncated)],
        ["verify", str(not_onnx)],
        ["verify", str(tmp_path / "missing.onnx")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("rnnzoo: error:") and "Traceback" not in err


def test_seq2seq_verify_checks_both_halves(tmp_path):
    torch.manual_seed(1)
    model = Seq2Seq(
        Seq2SeqConfig(cell="lstm_scratch", hidden_size=6, src_vocab_size=8, tgt_vocab_size=9)
    )
    task = {"kind": "seq2seq", "special_tokens": {"pad": 0, "bos": 1, "eos": 2}}
    ckpt = save_ckpt(tmp_path / "rev" / "model.pt", model, "rev", task, family="seq2seq")
    enc, dec = export_checkpoint(ckpt)
    report, files = verify_file(dec, times=(1, 4), batches=(2,), stream=(9, 2))
    assert report.ok, report.summary()
    assert files == [dec, enc]
    assert {c.graph for c in report.cases} == {"rev.encoder", "rev.decoder"}


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["lstm", "gru_scratch", "rnn_relu"])
def test_full_grid_up_to_ten_thousand_steps(tmp_path, cell):
    torch.manual_seed(2)
    net = RecurrentNet(RNNConfig(cell=cell, hidden_size=16, num_layers=2, input_size=2))
    net.eval()
    [p] = export_model(net, tmp_path / "m.onnx", name="m")
    report = verify_net(net, p)  # T in TIMES x B in BATCHES, streaming at T=1000
    assert report.ok, report.summary()
    assert not report.skipped
    whole = {(c.batch, c.time) for c in report.cases if c.mode == "whole"}
    assert whole == {(b, t) for b in BATCHES for t in TIMES}
    assert report.max_abs() < 1e-5


@pytest.mark.slow  # builds every entry's quick task (reads corpora)
def test_every_zoo_entry_exports_with_parity(tmp_path):
    """Each registered entry's own config (cell, depth, directions, I/O), shrunk, exports."""
    zoo = pytest.importorskip("rnnzoo.models.zoo")
    from rnnzoo.models.train import build_model

    assert zoo.REGISTRY, "the zoo registry is empty"
    for name, entry in zoo.REGISTRY.items():
        cfg = entry.model_config(quick=True)  # the task fixes input/output sizes and vocabs
        cfg.update({k: 4 for k in ("hidden_size", "embed_size") if k in cfg})
        torch.manual_seed(0)
        model = build_model(entry.family, cfg).eval()
        paths = export_model(model, tmp_path / f"{name}.onnx", name=name)
        nets = [model.encoder, model.decoder] if isinstance(model, Seq2Seq) else [model]
        for net, p in zip(nets, paths, strict=True):
            r = verify_net(net, p, times=(1, 5), batches=(2,), stream=(6, 2))
            assert r.ok, f"{name}: {r.summary()}"
            assert r.max_abs() is not None and np.isfinite(r.max_abs())


def test_zoo_hook_exports_verifies_and_reports_card_columns(lm_ckpt):
    from rnnzoo.export.zoo_hook import after_train

    cols = after_train(None, lm_ckpt, lm_ckpt.parent)  # the full T x B grid
    assert cols["onnx_files"] == ["chars.onnx"]
    assert cols["parity_max_abs"] < 1e-5 and cols["parity_max_abs_stream"] < 1e-5
    # Whole: every T x B; chunked: 3 chunkings at T=64 and 1000; per-step: 1 and 8 steps
    # from T=0 and each T, for every B; each case compares 3 tensors (logits, hn, cn).
    whole, chunked, steps = len(TIMES) * len(BATCHES), 3 * 2, 2 * (len(TIMES) + 1) * len(BATCHES)
    assert cols["parity_cases"] == 3 * (whole + chunked + steps)
    assert set(cols["ort_speedup_step_b1"]) == {"step"}
    assert cols["speed"]["seq1000"]["ort_ms"] > 0
    saved = json.loads((lm_ckpt.parent / "chars.parity.json").read_text())
    assert saved["ok"] is True
