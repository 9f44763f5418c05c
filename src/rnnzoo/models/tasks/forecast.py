"""Forecasting a noisy signal: sums of sines with drift and noise, next value from the past.

Each sequence is ``sum_k a_k sin(2 pi t / p_k + phi_k) + slope * t + noise`` with random
amplitudes, periods, phases and slope. The model reads values ``x_0..x_{T-1}`` and predicts
``x_1..x_T`` at every step; the loss and the metric skip the first ``warmup`` steps, where
no model can know the frequencies yet. The baseline is the naive forecaster that repeats
the last value. Values are normalised with the training mean/std, recorded in the metadata.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rnnzoo.models.tasks.base import Evaluation, Task


class SineForecast(Task):
    name = "sines"
    kind = "forecast"
    description = "next value of a noisy sum of sines with drift (normalised units)"

    def __init__(
        self,
        seq_len: int = 96,
        components: int = 3,
        period_range: tuple[float, float] = (8.0, 40.0),
        noise: float = 0.05,
        drift: float = 0.01,
        warmup: int = 16,
        eval_size: int = 512,
        seed: int = 1234,
    ) -> None:
        assert seq_len > warmup >= 0, "seq_len must exceed warmup"
        self.seq_len = seq_len
        self.components = components
        self.period_range = tuple(period_range)
        self.noise = noise
        self.drift = drift
        self.warmup = warmup
        gen = torch.Generator().manual_seed(seed)
        # Normalisation from a large sample of the generator itself (fixed by the seed).
        raw = self._raw(2048, gen)
        self.mean, self.std = float(raw.mean()), float(raw.std())
        self.eval_series = self._normalise(self._raw(eval_size, gen))  # (N, T+1)

    # ---- data ---------------------------------------------------------------------
    def _raw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n raw series of seq_len + 1 values: (n, T+1)."""
        t = torch.arange(self.seq_len + 1, dtype=torch.float32)  # (T+1,)
        k = self.components
        lo, hi = self.period_range
        amp = 0.3 + 0.7 * torch.rand(n, k, 1, generator=gen)
        period = lo + (hi - lo) * torch.rand(n, k, 1, generator=gen)
        phase = 2 * math.pi * torch.rand(n, k, 1, generator=gen)
        waves = (amp * torch.sin(2 * math.pi * t / period + phase)).sum(1)  # (n, T+1)
        slope = self.drift * (2 * torch.rand(n, 1, generator=gen) - 1)
        offset = 2 * torch.rand(n, 1, generator=gen) - 1
        noise = self.noise * torch.randn(n, self.seq_len + 1, generator=gen)
        return waves + slope * t + offset + noise

    def _normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std

    def batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        series = self._normalise(self._raw(batch_size, gen))  # (B, T+1)
        return series[:, :-1, None], series[:, 1:, None]  # x: (B, T, 1), y: (B, T, 1)

    # ---- model, loss, metric --------------------------------------------------------
    def model_io(self) -> dict[str, Any]:
        return {"input_size": 1, "output_size": 1, "vocab_size": None}

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "normalization": {"mean": self.mean, "std": self.std},
            "input_features": ["value"],
            "output_features": ["next value"],
            "warmup": self.warmup,
        }

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        pred, _ = model(x)  # (B, T, 1)
        w = self.warmup
        return nn.functional.mse_loss(pred[:, w:], y[:, w:])

    @torch.no_grad()
    def predict(self, model: nn.Module, series: torch.Tensor) -> torch.Tensor:
        """One-step-ahead forecasts of ``series[:, 1:]`` from its past: (N, T)."""
        pred, _ = model(series[:, :-1, None])
        return pred[..., 0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Evaluation:
        s, w = self.eval_series, self.warmup
        pred = self.predict(model, s)  # (N, T)
        truth = s[:, 1:]
        mse = float(((pred[:, w:] - truth[:, w:]) ** 2).mean())
        naive = float(((s[:, :-1][:, w:] - truth[:, w:]) ** 2).mean())
        return Evaluation("mse", mse, naive, "naive last value", higher_is_better=False)
