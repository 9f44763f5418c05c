"""The training loop: loss goes down, clipping fires and is counted, runs are deterministic."""

from __future__ import annotations

import pytest
import torch

from rnnzoo.errors import InvalidArgument
from rnnzoo.models.rnn import RecurrentNet, RNNConfig
from rnnzoo.models.tasks.adding import AddingProblem
from rnnzoo.models.tasks.forecast import SineForecast
from rnnzoo.models.train import TrainConfig, build_model, set_forget_bias, train


def _run(cfg: TrainConfig, cell: str = "gru", task=None):
    task = task or SineForecast(seq_len=32, warmup=4, eval_size=64)
    torch.manual_seed(cfg.seed)
    net = RecurrentNet(RNNConfig(cell, 16, **task.model_io()))
    info = train(net, task, cfg, progress=False)
    return net, info, task


def test_loss_decreases_on_a_tiny_problem():
    net, info, task = _run(TrainConfig(steps=120, batch_size=16, lr=1e-2, log_every=10))
    curve = [loss for _, loss in info["loss_curve"]]
    assert len(curve) == 12 and info["loss_curve"][-1][0] == 119
    assert curve[-1] < 0.5 * curve[0]
    ev = task.evaluate(net)
    assert ev.value < ev.baseline  # beats the naive forecaster after 120 steps
    assert not net.training  # handed back in eval mode


def test_clipping_fires_and_is_recorded():
    _, loose, _ = _run(TrainConfig(steps=20, batch_size=8, clip=1e6))
    _, tight, _ = _run(TrainConfig(steps=20, batch_size=8, clip=1e-3))
    assert loose["clip_fraction"] == 0.0
    assert tight["clip_fraction"] == 1.0
    assert all(g > 1e-3 for _, g in tight["grad_norm_curve"])  # pre-clip norms are recorded


def test_same_seed_same_run_other_seed_other_run():
    cfg = TrainConfig(steps=15, batch_size=8, seed=3, log_every=5)
    a, ia, _ = _run(cfg)
    b, ib, _ = _run(cfg)
    _c, ic, _ = _run(TrainConfig(steps=15, batch_size=8, seed=4, log_every=5))
    assert ia["loss_curve"] == ib["loss_curve"]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert ia["loss_curve"] != ic["loss_curve"]


def test_probes_record_gradients_wrt_inputs():
    task = AddingProblem(seq_len=30, eval_size=50)
    _, info, _ = _run(TrainConfig(steps=6, batch_size=8, probe_every=2), task=task)
    assert [p["step"] for p in info["probes"]] == [0, 2, 4]
    assert all(p["grad_early"] >= 0 and p["grad_late"] > 0 for p in info["probes"])


def test_forget_bias_sets_only_lstm_forget_gates():
    torch.manual_seed(0)
    net = build_model("rnn", {"cell": "lstm", "hidden_size": 4, "num_layers": 2})
    set_forget_bias(net, 2.0)
    for name, p in net.rnn.named_parameters():
        if name.startswith("bias_"):
            assert torch.all(p[4:8] == 1.0), name  # ih + hh = 2
    gru = build_model("rnn", {"cell": "gru", "hidden_size": 4})
    before = {k: v.clone() for k, v in gru.state_dict().items()}
    set_forget_bias(gru, 2.0)
    assert all(torch.equal(before[k], v) for k, v in gru.state_dict().items())


def test_bad_configs_are_user_errors():
    with pytest.raises(InvalidArgument, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(InvalidArgument, match="lr"):
        TrainConfig(steps=1, lr=0)
    with pytest.raises(InvalidArgument, match="family"):
        build_model("transformer", {})
