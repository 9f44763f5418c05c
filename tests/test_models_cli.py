"""`rnnzoo zoo list`, `rnnzoo train`, `rnnzoo zoo build` through the real dispatcher."""

from __future__ import annotations

import json

import pytest

from rnnzoo.cli import main
from rnnzoo.models.checkpoint import load_checkpoint
from rnnzoo.models.zoo import ENTRIES


def test_zoo_list_json(capsys):
    assert main(["zoo", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == [e.name for e in ENTRIES]
    assert all({"task", "model", "train", "floor"} <= set(d) for d in data)


def test_zoo_list_text(capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert all(e.name in out for e in ENTRIES)


def test_unknown_entry_is_a_clean_error(capsys, tmp_path):
    assert main(["train", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown zoo entry 'nope'" in err and "sine-rnn" in err and "Traceback" not in err
    assert main(["zoo", "build", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "known entries" in capsys.readouterr().err


def test_train_one_entry_quick(tmp_path, capsys):
    assert main(["train", "sine-rnn", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    _model, ckpt = load_checkpoint(tmp_path / "sine-rnn" / "model.pt")
    assert ckpt["train"]["steps"] == 30 and ckpt["metrics"]["quick"] is True
    assert ckpt["task"]["normalization"]["std"] > 0
    assert "sine-rnn: mse=" in capsys.readouterr().err


@pytest.mark.slow
def test_zoo_build_quick_writes_the_card(tmp_path):
    rc = main(
        [
            "zoo",
            "build",
            "--quick",
            "--no-export",
            "--no-progress",
            "--out",
            str(tmp_path),
            "--only",
            "sine-gru-scratch",
            "num2words",
        ]
    )
    assert rc == 0
    card = (tmp_path / "ZOO.md").read_text()
    assert "`sine-gru-scratch`" in card and "`num2words`" in card and "gru enc-dec" in card
    for name in ("sine-gru-scratch", "num2words"):
        assert (tmp_path / name / "model.pt").is_file()
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["floor"]["met"] in (True, False, None) and metrics["quick"] is True


@pytest.mark.slow
def test_zoo_build_quick_every_entry(tmp_path):
    """The whole zoo, tiny: every entry trains, evaluates and gets a card row."""
    rc = main(["zoo", "build", "--quick", "--no-export", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    card = (tmp_path / "ZOO.md").read_text()
    for e in ENTRIES:
        assert f"| [`{e.name}`](#{e.name}) |" in card and f'<a id="{e.name}">' in card
        assert load_checkpoint(tmp_path / e.name)[1]["name"] == e.name
