"""The training loop: Adam, cosine learning-rate decay, gradient-norm clipping, a progress bar.

Deterministic for a seed: the seed fixes the initial weights and the generator the task
draws batches from (single-threaded CPU kernels are deterministic in PyTorch). Besides the
loss curve it records how large the gradient was before clipping, how often clipping fired
and, for tasks that define ``probe``, gradient diagnostics (the vanishing-gradient story).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rnnzoo.errors import InvalidArgument
from rnnzoo.models.rnn import RecurrentNet, RNNConfig, Seq2Seq, Seq2SeqConfig
from rnnzoo.models.tasks.base import Task


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_frac: float = 0.1  # cosine decay from lr to lr * min_lr_frac
    clip: float = 1.0  # max global gradient norm
    seed: int = 0
    log_every: int = 10  # one loss-curve point per this many steps
    probe_every: int = 0  # gradient probes (tasks with ``probe``); 0: never
    forget_bias: float | None = None  # LSTM only: initial forget-gate bias (a standard trick)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise InvalidArgument("train steps and batch_size must be >= 1")
        if self.lr <= 0 or self.clip <= 0:
            raise InvalidArgument("train lr and clip must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(family: str, config: dict[str, Any]) -> nn.Module:
    """A RecurrentNet (``family="rnn"``) or Seq2Seq from its config dict."""
    if family == "rnn":
        return RecurrentNet(RNNConfig(**config))
    if family == "seq2seq":
        return Seq2Seq(Seq2SeqConfig(**config))
    raise InvalidArgument(f"unknown model family {family!r}; expected 'rnn' or 'seq2seq'")


def set_forget_bias(model: nn.Module, value: float) -> None:
    """Set every LSTM layer's forget-gate bias (PyTorch gate order i, f, g, o) to ``value``.

    Split evenly over ``bias_ih``/``bias_hh`` since the cell adds them. A no-op for
    non-LSTM cores, so one train config can cover several cells.
    """
    for mod in model.modules():
        cfg = getattr(mod, "cfg", None)
        if not isinstance(cfg, RNNConfig) or not cfg.is_lstm:
            continue
        H = cfg.hidden_size
        core = mod.get_submodule("rnn")
        with torch.no_grad():
            for pname, p in core.named_parameters():
                if pname.startswith("bias_"):
                    p[H : 2 * H] = value / 2


def _lr_at(cfg: TrainConfig, step: int) -> float:
    frac = step / max(1, cfg.steps - 1)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    *,
    progress: bool | None = None,
    desc: str = "train",
) -> dict[str, Any]:
    """Train ``model`` on ``task`` in place; returns the training record for the checkpoint.

    ``progress``: None shows a bar only when stderr is a terminal.
    """
    from tqdm import tqdm  # lazy: only training needs it

    if cfg.forget_bias is not None:
        set_forget_bias(model, cfg.forget_bias)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=cfg.steps, desc=desc, file=sys.stderr, disable=not show, leave=False)
    loss_curve: list[list[float]] = []  # [step, mean loss over the interval]
    grad_curve: list[list[float]] = []  # [step, mean pre-clip gradient norm over the interval]
    probes: list[dict[str, float]] = []
    clipped = 0
    acc_loss = acc_grad = 0.0
    acc_n = 0
    first_loss = last_loss = math.nan
    t0 = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        batch = task.batch(cfg.batch_size, gen)
        if cfg.probe_every and step % cfg.probe_every == 0 and hasattr(task, "probe"):
            probes.append({"step": step, **task.probe(model, batch)})
        loss = task.loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The pre-clip norm is returned: record it, and count how often clipping fired.
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        clipped += norm > cfg.clip
        opt.step()
        value = loss.item()
        if step == 0:
            first_loss = value
        acc_loss, acc_grad, acc_n = acc_loss + value, acc_grad + norm, acc_n + 1
        if acc_n == cfg.log_every or step == cfg.steps - 1:
            loss_curve.append([step, acc_loss / acc_n])
            grad_curve.append([step, acc_grad / acc_n])
            last_loss = acc_loss / acc_n
            bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
            acc_loss = acc_grad = 0.0
            acc_n = 0
        bar.update(1)
    bar.close()
    model.eval()
    return {
        **cfg.to_dict(),
        "seconds": time.perf_counter() - t0,
        "first_loss": first_loss,
        "final_loss": last_loss,
        "loss_curve": loss_curve,
        "grad_norm_curve": grad_curve,
        "clip_fraction": clipped / cfg.steps,
        "probes": probes,
        "torch": str(torch.__version__),
    }
