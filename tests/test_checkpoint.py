"""Checkpoints: round trip through the design.md format, clear errors naming the file."""

from __future__ import annotations

import pytest
import torch

from rnnzoo.errors import InvalidArgument, NotFound
from rnnzoo.models.checkpoint import (
    FORMAT,
    load_checkpoint,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from rnnzoo.models.rnn import RecurrentNet, RNNConfig, Seq2Seq, Seq2SeqConfig


def _ckpt(model, family="rnn"):
    task = {"name": "t", "kind": "tag", "vocab": ["a", "b"], "labels": ["x", "y"]}
    return make_checkpoint(
        "m", family, model, task, {"metric": "accuracy", "value": 0.5}, {"seed": 1}
    )


@pytest.mark.parametrize("cell", ["lstm", "gru_scratch"])
def test_round_trip_rnn(tmp_path, cell):
    torch.manual_seed(0)
    net = RecurrentNet(RNNConfig(cell, 8, num_layers=2, vocab_size=5, output_size=3)).eval()
    path = save_checkpoint(_ckpt(net), tmp_path / "sub" / "model.pt")
    assert not (tmp_path / "sub" / "model.pt.tmp").exists()
    model, ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["task"]["labels"] == ["x", "y"]
    assert ckpt["config"] == net.cfg.to_dict() and not model.training
    x = torch.randint(0, 5, (2, 7))
    assert torch.equal(model(x)[0], net(x)[0])
    # The folder works too, and the file loads with weights_only (no code in it).
    assert load_checkpoint(tmp_path / "sub")[1]["name"] == "m"
    assert torch.load(path, weights_only=True)["family"] == "rnn"


def test_round_trip_seq2seq(tmp_path):
    torch.manual_seed(0)
    s2s = Seq2Seq(Seq2SeqConfig("gru", 8, src_vocab_size=6, tgt_vocab_size=7)).eval()
    model, _ = load_checkpoint(save_checkpoint(_ckpt(s2s, "seq2seq"), tmp_path / "s.pt"))
    src = torch.randint(0, 6, (3, 4))
    assert torch.equal(model.greedy_decode(src, 1, 2, 5), s2s.greedy_decode(src, 1, 2, 5))


def test_missing_file_is_not_found_naming_it(tmp_path):
    with pytest.raises(NotFound, match=r"nope\.pt: no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(NotFound, match=r"model\.pt"):
        load_checkpoint(tmp_path)  # a folder without model.pt


def test_corrupt_and_foreign_files_are_invalid(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a zip")
    with pytest.raises(InvalidArgument, match=r"bad\.pt: not a readable checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(InvalidArgument, match=r"other\.pt: not an rnnzoo.checkpoint/1"):
        read_checkpoint(other)
    torch.manual_seed(0)
    ckpt = _ckpt(RecurrentNet(RNNConfig("gru", 4)))
    del ckpt["metrics"]
    torch.save(ckpt, other)
    with pytest.raises(InvalidArgument, match=r"lacks.*metrics"):
        read_checkpoint(other)
    ckpt = _ckpt(RecurrentNet(RNNConfig("gru", 4)))
    ckpt["config"]["hidden_size"] = 5  # weights no longer fit the config
    torch.save(ckpt, other)
    with pytest.raises(InvalidArgument, match="do not make a model"):
        load_checkpoint(other)
