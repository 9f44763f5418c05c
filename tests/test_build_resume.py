"""The zoo build cannot fail halfway: it resumes (up-to-date entries are not redone), and a
failed parity check leaves nothing `rnnzoo serve` would serve, only a record saying so."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rnnzoo.errors import FailedPrecondition, NotFound
from rnnzoo.export.zoo_hook import after_train
from rnnzoo.models import zoo
from rnnzoo.models.build import build_zoo, config_hash
from rnnzoo.models.zoo import get_entry
from rnnzoo.server.runtime import ModelRepository


def _build(out, only, hooks=(after_train,), **kw):
    lines: list[str] = []
    results = build_zoo(out, only=only, quick=True, after_train=hooks, log=lines.append, **kw)
    return results, lines


def _stamps(d):
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.is_file()}


@pytest.mark.slow
def test_a_quick_build_run_twice_trains_nothing_the_second_time(tmp_path):
    _, first = _build(tmp_path, ["sine-rnn"])
    text = "\n".join(first)
    for stage in ("training ... done", "export ... done", "verify ... ok (", "bench ... done"):
        assert f"[1/1] sine-rnn: {stage}" in text, text
    entry = tmp_path / "sine-rnn"
    record = json.loads((entry / "sine-rnn.parity.json").read_text())
    assert record["ok"] is True and set(record["files"]) == {"sine-rnn.onnx"}
    assert record["config_hash"] == config_hash(get_entry("sine-rnn"), quick=True)
    assert json.loads((entry / "metrics.json").read_text())["config_hash"] == record["config_hash"]
    assert not (entry / ".staging").exists()  # promoted, nothing left behind
    before = _stamps(entry)

    results, second = _build(tmp_path, ["sine-rnn"])
    assert any("sine-rnn: up to date" in ln for ln in second), second
    assert not [
        ln for ln in second if any(f"{s} ..." in ln for s in ("training", "export", "verify"))
    ]
    stamps = _stamps(entry)
    for f in ("model.pt", "sine-rnn.onnx", "sine-rnn.parity.json"):
        assert stamps[f] == before[f], f  # not rewritten
    assert results[0]["extra"]["parity_ok"] is True  # the card row, reused from metrics.json
    assert "[`sine-rnn`]" in (tmp_path / "ZOO.md").read_text()

    # Checkpoint fine, parity record gone: export and verify again, do not retrain.
    (entry / "sine-rnn.parity.json").unlink()
    _, third = _build(tmp_path, ["sine-rnn"])
    text = "\n".join(third)
    assert "training ... up to date" in text and "training ... done" not in text
    assert "verify ... ok" in text
    assert _stamps(entry)["model.pt"] == before["model.pt"]
    assert json.loads((entry / "sine-rnn.parity.json").read_text())["ok"] is True


@pytest.mark.slow
def test_a_config_change_retrains_that_entry_only(tmp_path, monkeypatch):
    only = ["sine-rnn", "sine-gru-scratch"]
    _, first = _build(tmp_path, only, hooks=())
    assert sum("training ... done" in ln for ln in first) == 2
    assert "up to date" in "\n".join(_build(tmp_path, only, hooks=())[1])
    before = _stamps(tmp_path / "sine-rnn")

    old = get_entry("sine-gru-scratch")
    changed = dataclasses.replace(old, train={**old.train, "lr": old.train["lr"] / 2})
    assert config_hash(changed, True) != config_hash(old, True)
    entries = [changed if e.name == old.name else e for e in zoo.ENTRIES]
    monkeypatch.setattr(zoo, "ENTRIES", entries)
    monkeypatch.setattr(zoo, "REGISTRY", {e.name: e for e in entries})
    _, lines = _build(tmp_path, only, hooks=())
    text = "\n".join(lines)
    assert "[1/2] sine-rnn: up to date" in text
    assert "[2/2] sine-gru-scratch: training ... done" in text
    assert "sine-rnn: training" not in text
    assert _stamps(tmp_path / "sine-rnn")["model.pt"] == before["model.pt"]
    metrics = json.loads((tmp_path / "sine-gru-scratch" / "metrics.json").read_text())
    assert metrics["config_hash"] == config_hash(changed, True) and metrics["train"]["lr"] == (
        old.train["lr"] / 2
    )


def _corrupting_export(monkeypatch):
    """The real export, then every weight matrix of the written graph scaled by 1.01: a
    graph that loads and runs but is wrong, for the real verify to catch."""
    import rnnzoo.export.cli as export_cli

    real = export_cli.export_checkpoint

    def export_then_corrupt(ckpt_path, out=None):
        files = real(ckpt_path, out)
        for path in files:
            model = onnx.load(str(path))
            for init in model.graph.initializer:
                arr = numpy_helper.to_array(init)
                if arr.dtype == np.float32 and arr.ndim >= 2:
                    init.CopyFrom(numpy_helper.from_array(arr * np.float32(1.01), init.name))
            onnx.save(model, str(path))
        return files

    monkeypatch.setattr(export_cli, "export_checkpoint", export_then_corrupt)


@pytest.mark.slow
def test_a_failed_parity_leaves_nothing_servable_and_a_record_saying_so(tmp_path, monkeypatch):
    entry = tmp_path / "sine-rnn"
    _build(tmp_path, ["sine-rnn"])
    assert ModelRepository.from_dir(tmp_path).get("sine-rnn")  # served after a good build

    (entry / "sine-rnn.parity.json").unlink()  # not up to date: export and verify again
    with monkeypatch.context() as m:
        _corrupting_export(m)
        lines: list[str] = []
        with pytest.raises(FailedPrecondition) as err:
            build_zoo(
                tmp_path, only=["sine-rnn"], quick=True, after_train=[after_train], log=lines.append
            )
    msg = str(err.value)
    assert "zoo entry sine-rnn" in msg and "parity failed" in msg and "quarantined" in msg
    assert "rnnzoo verify" in msg and "redoes only what is not up to date" in msg
    assert any("sine-rnn: verify ... FAILED" in ln for ln in lines), lines
    # Nothing servable: the earlier good .onnx is gone too, the failing one is quarantined.
    assert not (entry / "sine-rnn.onnx").exists()
    assert (entry / ".staging" / "sine-rnn.onnx").is_file()
    with pytest.raises(NotFound, match=r"no \.onnx files"):
        ModelRepository.from_dir(tmp_path)
    record = json.loads((entry / "sine-rnn.parity.json").read_text())
    assert record["ok"] is False and "FAIL" in record["summary"]
    assert record["location"] == ".staging" and set(record["files"]) == {"sine-rnn.onnx"}
    # The card is still written, saying which entry failed.
    assert "✘ **failed**" in (tmp_path / "ZOO.md").read_text()

    # Were the quarantined file put back by hand, the server would refuse it by its record.
    (entry / ".staging" / "sine-rnn.onnx").rename(entry / "sine-rnn.onnx")
    with pytest.raises(FailedPrecondition, match=r"sine-rnn\.parity\.json says"):
        ModelRepository.from_dir(tmp_path)

    # A rerun without the fault resumes: no retraining, a verified export, served again.
    _, rerun = _build(tmp_path, ["sine-rnn"])
    text = "\n".join(rerun)
    assert "training ... up to date" in text and "verify ... ok" in text
    assert json.loads((entry / "sine-rnn.parity.json").read_text())["ok"] is True
    assert ModelRepository.from_dir(tmp_path).get("sine-rnn")


@pytest.mark.slow
def test_entries_built_in_parallel_processes_equal_entries_built_one_at_a_time(tmp_path, capfd):
    """``jobs=2`` builds each entry in its own process: the same checkpoints, records and
    card rows as a one-at-a-time build, and a floor comparing two entries is still settled."""
    import torch

    only = ["sine-rnn", "tag-gru", "tag-bigru"]
    one = build_zoo(tmp_path / "one", only=only, quick=True, after_train=[after_train], log=print)
    two = build_zoo(
        tmp_path / "two", only=only, quick=True, after_train=[after_train], log=print, jobs=2
    )
    out = capfd.readouterr().out
    assert sum("verify ... ok" in ln for ln in out.splitlines()) == 2 * len(only)
    assert [r["name"] for r in two] == only
    for a, b in zip(one, two, strict=True):
        assert a["metrics"]["value"] == b["metrics"]["value"], a["name"]
        assert a["floor"] == b["floor"], a["name"]
        sa = torch.load(tmp_path / "one" / a["name"] / "model.pt", weights_only=False)
        sb = torch.load(tmp_path / "two" / b["name"] / "model.pt", weights_only=False)
        for k, v in sa["state_dict"].items():
            assert torch.equal(v, sb["state_dict"][k]), (a["name"], k)
        record = json.loads((tmp_path / "two" / b["name"] / f"{b['name']}.parity.json").read_text())
        assert record["ok"] is True
    assert "`tag-bigru`" in (tmp_path / "two" / "ZOO.md").read_text()
