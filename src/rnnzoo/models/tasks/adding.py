"""The adding problem (Hochreiter & Schmidhuber 1997): a long-range whole-sequence task.

Each step carries two features: a random value in [0, 1) and a marker (0 or 1). Exactly two
steps are marked, one among the first ``T // 10`` steps and one in the second half; the
target, read at the last step only, is the sum of the two marked values. The first marker
sits ~``0.9 T`` steps before the answer, so the gradient that teaches the model to keep it
must flow back through that many steps: a tanh RNN's vanishes, a GRU's/LSTM's need not.

The trivial predictor outputs the mean target (1.0) and scores the target's variance
(1/6); a model that keeps only the second marked value scores 1/12 (ratio 0.5).
``probe`` measures the gradient of the loss w.r.t. the inputs at early and late steps,
the vanishing-gradient story the card plots.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rnnzoo.models.tasks.base import Evaluation, Task


class AddingProblem(Task):
    name = "adding"
    kind = "generic"  # one regression output read at the last step
    description = "adding problem: sum of the two marked values, read at the last step"

    def __init__(self, seq_len: int = 100, eval_size: int = 2000, seed: int = 4321) -> None:
        assert seq_len >= 20, "seq_len must be >= 20 (markers live in the first tenth)"
        self.seq_len = seq_len
        gen = torch.Generator().manual_seed(seed)
        self.eval_x, self.eval_y = self.batch(eval_size, gen)
        # The trivial predictor's constant is the mean target of a training-sized sample.
        _, y = self.batch(10_000, gen)
        self.trivial = float(y.mean())

    def batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        B, T = batch_size, self.seq_len
        values = torch.rand(B, T, generator=gen)  # (B, T)
        marks = torch.zeros(B, T)
        first = torch.randint(0, max(1, T // 10), (B,), generator=gen)
        second = torch.randint(T // 2, T, (B,), generator=gen)
        rows = torch.arange(B)
        marks[rows, first] = 1.0
        marks[rows, second] = 1.0
        x = torch.stack([values, marks], dim=-1)  # (B, T, 2)
        y = (values * marks).sum(1, keepdim=True)  # (B, 1)
        return x, y

    def model_io(self) -> dict[str, Any]:
        return {"input_size": 2, "output_size": 1, "vocab_size": None}

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "input_features": ["value", "marker"],
            "output_features": ["sum of marked values (read at the last step)"],
            "seq_len": self.seq_len,
        }

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        pred, _ = model(x)  # (B, T, 1): only the last step is the answer
        return nn.functional.mse_loss(pred[:, -1], y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Evaluation:
        pred, _ = model(self.eval_x)
        mse = float(((pred[:, -1] - self.eval_y) ** 2).mean())
        trivial = float(((self.trivial - self.eval_y) ** 2).mean())
        return Evaluation("mse", mse, trivial, "trivial (mean target)", higher_is_better=False)

    def probe(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        """Mean gradient norm of the loss w.r.t. the inputs at the first and last tenth."""
        x, y = batch
        x = x.detach().clone().requires_grad_(True)
        pred, _ = model(x)
        loss = nn.functional.mse_loss(pred[:, -1], y)
        (grad,) = torch.autograd.grad(loss, x)  # (B, T, 2)
        per_step = grad.norm(dim=-1).mean(0)  # (T,)
        k = max(1, self.seq_len // 10)
        return {"grad_early": float(per_step[:k].mean()), "grad_late": float(per_step[-k:].mean())}
