"""The zoo registry (data, lookups, errors), floors, and a quick build with a hook."""

from __future__ import annotations

import json

import pytest
import torch

from rnnzoo.errors import FailedPrecondition, NotFound
from rnnzoo.models.build import build_zoo
from rnnzoo.models.checkpoint import load_checkpoint
from rnnzoo.models.rnn import RNNConfig, Seq2SeqConfig
from rnnzoo.models.zoo import ENTRIES, REGISTRY, Entry, check_floor, get_entry, select


def test_registry_is_data_and_covers_the_issue():
    names = [e.name for e in ENTRIES]
    assert len(names) == len(set(names)) == len(REGISTRY)
    cells = {e.model["cell"] for e in ENTRIES}
    assert {"rnn_tanh", "rnn_relu", "gru", "lstm"} <= cells
    assert cells & {"gru_scratch", "lstm_scratch"}
    assert any(e.model.get("num_layers", 1) >= 2 for e in ENTRIES if e.task == "charlm")
    assert {e.task for e in ENTRIES} == {"sines", "charlm", "adding", "pytag", "num2words"}
    # The long-range entries share one budget.
    budgets = {json.dumps(e.train, sort_keys=True) for e in ENTRIES if e.task == "adding"}
    assert len(budgets) == 1
    for e in ENTRIES:
        json.dumps(e.to_dict())  # plain data
        if "beats" in e.floor:  # a twin is built before the entry that must beat it
            assert names.index(e.floor["beats"]) < names.index(e.name)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(NotFound, match=r"unknown zoo entry 'nope'; known entries: sine-rnn"):
        get_entry("nope")
    with pytest.raises(NotFound, match="char-gru"):
        select(["sine-rnn", "nope"])
    assert [e.name for e in select(["num2words", "sine-rnn"])] == ["sine-rnn", "num2words"]
    assert select(None) == ENTRIES


def test_entry_config_is_the_full_model_config():
    cfg = get_entry("sine-rnn").config
    assert isinstance(cfg, RNNConfig) and cfg.input_size == 1 and cfg.output_size == 1
    s2s = get_entry("num2words").config
    assert isinstance(s2s, Seq2SeqConfig) and s2s.src_vocab_size == 13


def test_floors():
    e = get_entry("sine-rnn")
    assert check_floor(e, {"metric": "mse", "ratio": 0.2}, {})["met"] is True
    assert check_floor(e, {"metric": "mse", "ratio": 0.31}, {})["met"] is False
    bi = get_entry("tag-bigru")
    assert check_floor(bi, {"metric": "accuracy", "value": 0.9}, {"tag-gru": {"value": 0.8}})["met"]
    assert not check_floor(bi, {"metric": "accuracy", "value": 0.7}, {"tag-gru": {"value": 0.8}})[
        "met"
    ]
    assert check_floor(bi, {"metric": "accuracy", "value": 0.9}, {})["met"] is None
    n2w = get_entry("num2words")
    assert check_floor(n2w, {"metric": "exact_match", "value": 0.89}, {})["met"] is False


@pytest.mark.slow
def test_quick_build_runs_hooks_writes_metrics_and_card(tmp_path):
    seen = []

    def hook(entry, ckpt_path, out_dir):
        model, ckpt = load_checkpoint(ckpt_path)
        seen.append((entry.name, out_dir.name, ckpt["name"]))
        return {"hooked": entry.name, "params_again": sum(p.numel() for p in model.parameters())}

    before = torch.get_num_threads()
    results = build_zoo(
        tmp_path,
        only=["sine-rnn", "adding-gru"],
        quick=True,
        after_train=[hook],
        log=lambda m: None,
    )
    assert torch.get_num_threads() == before  # restored
    assert seen == [
        ("sine-rnn", "sine-rnn", "sine-rnn"),
        ("adding-gru", "adding-gru", "adding-gru"),
    ]
    for r in results:
        data = json.loads((tmp_path / r["name"] / "metrics.json").read_text())
        assert data["extra"]["hooked"] == r["name"]
        assert data["extra"]["params_again"] == data["metrics"]["parameters"]
        assert data["quick"] is True
    card = (tmp_path / "ZOO.md").read_text()
    assert "Quick build" in card and "not claimed" in card
    # The main table is short; hook columns are details under each model.
    assert "| model | task | cell | metric | value | baseline | floor | parity |" in card
    assert "  - params_again: " in card and "| params_again" not in card
    for pic in ("forecast.png", "curves.png", "gradients.png"):
        assert (tmp_path / pic).stat().st_size > 1000 and f"]({pic})" in card
    # Retraining one entry into the same folder keeps the other's row on the card.
    build_zoo(tmp_path, only=["sine-rnn"], quick=True, log=lambda m: None)
    card = (tmp_path / "ZOO.md").read_text()
    assert "`adding-gru`" in card and "`sine-rnn`" in card


@pytest.mark.slow
def test_full_build_fails_loudly_naming_the_entry(tmp_path, monkeypatch):
    import rnnzoo.models.zoo as zoo

    # A real entry with an unreachable floor, trained for a few steps.
    hopeless = Entry(
        name="sine-hopeless",
        group="forecast",
        task="sines",
        task_params={"seq_len": 24, "warmup": 4, "eval_size": 16},
        model={"cell": "rnn_tanh", "hidden_size": 4},
        train={"steps": 3, "batch_size": 4},
        floor={"max_ratio": 1e-9},
    )
    monkeypatch.setattr(zoo, "ENTRIES", [hopeless])
    monkeypatch.setattr(zoo, "REGISTRY", {hopeless.name: hopeless})
    with pytest.raises(FailedPrecondition, match="missed their floor: sine-hopeless"):
        build_zoo(tmp_path, log=lambda m: None)
    assert "✘ **missed**" in (tmp_path / "ZOO.md").read_text()  # the card is still written
