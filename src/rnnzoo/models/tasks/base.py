"""What every task provides: data, a loss, a metric with its baseline, and contract metadata.

A task is built from plain keyword parameters (the zoo keeps them as data), owns its fixed
held-out set (drawn from the task's own seed) and draws training batches from a
``torch.Generator`` that the training loop seeds, so a run is reproducible end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Evaluation:
    """A task metric next to the baseline it must beat."""

    metric: str  # "mse", "bpc", "accuracy", "exact_match"
    value: float
    baseline: float
    baseline_name: str  # what the baseline is, e.g. "naive last value"
    higher_is_better: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """value / baseline (lower is better for losses, higher for accuracies)."""
        return self.value / self.baseline if self.baseline else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": self.value,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "higher_is_better": self.higher_is_better,
            "ratio": self.ratio,
            **self.extra,
        }


class Task:
    """Base class. Subclasses set ``name``/``kind`` and implement the methods below."""

    name: str = ""
    kind: str = "generic"  # a contract task kind: forecast, classify, tag, lm, seq2seq
    family: str = "rnn"  # "rnn" (RecurrentNet) or "seq2seq" (Seq2Seq)
    description: str = ""

    def model_io(self) -> dict[str, Any]:
        """Config fields the task fixes: input_size/vocab_size/output_size (or seq2seq vocabs)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """The checkpoint's ``task`` dict: name, kind and what a client needs (vocab, labels...)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "io": self.model_io(),  # input/output sizes (or vocab sizes) the model was built with
        }

    def batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """One training batch drawn with ``gen``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Evaluation:
        """The task metric on the held-out set, next to its baseline (model in eval mode)."""
        raise NotImplementedError


def char_vocab(text: str, min_count: int = 1, unk: str = "\ufffd") -> list[str]:
    """Sorted characters of ``text`` seen at least ``min_count`` times, plus ``unk`` at id 0."""
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    chars = sorted(ch for ch, n in counts.items() if n >= min_count and ch != unk)
    return [unk, *chars]


def encode_chars(text: str, vocab: list[str]) -> torch.Tensor:
    """Characters -> int64 ids; characters outside ``vocab`` map to id 0 (the unk)."""
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index.get(ch, 0) for ch in text], dtype=torch.long)
