"""Sequence to sequence: a number's digits -> its English words, e.g. ``90210`` ->
``ninety thousand two hundred ten``.

Source tokens are digit characters; target tokens are words (``ninety-one`` is one word).
Both vocabularies start with ``<pad>``, ``<bos>``, ``<eos>`` at ids 0, 1, 2. A batch holds
numbers of one digit count (so the encoder never reads padding); the digit count is drawn
uniformly, so short numbers are trained as often as long ones. A fixed tenth of all
numbers (by a multiplicative hash) is held out and never trained on. Metric: exact match
of the greedy decode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rnnzoo.models.rnn import Seq2Seq
from rnnzoo.models.tasks.base import Evaluation, Task

SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2
ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _below_thousand(n: int) -> list[str]:
    assert 0 < n < 1000
    out: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        out += [ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        out.append(TENS[tens] + (f"-{ONES[ones]}" if ones else ""))
    elif rest:
        out.append(ONES[rest])
    return out


def number_words(n: int) -> list[str]:
    """0 <= n < 1_000_000 in English words, American style (no "and")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words handles 0..999999, got {n}")
    if n == 0:
        return ["zero"]
    thousands, rest = divmod(n, 1000)
    out = [*_below_thousand(thousands), "thousand"] if thousands else []
    return out + (_below_thousand(rest) if rest else [])


def target_vocab() -> list[str]:
    words = [*ONES[1:], "zero", "hundred", "thousand"]
    words += [t for t in TENS[2:]] + [f"{t}-{o}" for t in TENS[2:] for o in ONES[1:10]]
    return SPECIALS + sorted(set(words))


def is_heldout(n: int) -> bool:
    """A fixed tenth of all numbers, spread evenly, never trained on."""
    return (n * 2654435761) % (1 << 32) % 10 == 0


class NumToWords(Task):
    name = "num2words"
    kind = "seq2seq"
    family = "seq2seq"
    description = "digits of a number 0..999999 -> its English words (greedy decoding)"

    def __init__(self, max_digits: int = 6, eval_per_length: int = 400, seed: int = 99) -> None:
        assert 1 <= max_digits <= 6
        self.max_digits = max_digits
        self.src_vocab = SPECIALS + list("0123456789")
        self.tgt_vocab = target_vocab()
        self._tgt_index = {w: i for i, w in enumerate(self.tgt_vocab)}
        gen = torch.Generator().manual_seed(seed)
        # Held-out numbers per digit count (all of them where there are few).
        self.eval_numbers: list[list[int]] = []
        for d in range(1, max_digits + 1):
            lo, hi = (0 if d == 1 else 10 ** (d - 1)), 10**d
            pool = [n for n in range(lo, min(hi, lo + 200_000)) if is_heldout(n)]
            if d <= 2:  # so few numbers that holding some out would leave gaps: test all
                pool = list(range(lo, hi))
            pick = torch.randperm(len(pool), generator=gen)[:eval_per_length]
            self.eval_numbers.append(sorted(pool[i] for i in pick.tolist()))
        self.max_target = max(len(number_words(n)) for n in (777_777, 373_373)) + 1

    # ---- encoding ---------------------------------------------------------------------
    def encode_source(self, n: int) -> list[int]:
        return [self.src_vocab.index(ch) for ch in str(n)]

    def encode_target(self, n: int) -> list[int]:
        return [self._tgt_index[w] for w in number_words(n)] + [EOS]

    def decode_target(self, ids: list[int]) -> str:
        words = []
        for i in ids:
            if i == EOS:
                break
            words.append(self.tgt_vocab[i])
        return " ".join(words)

    def _sample_numbers(self, digits: int, count: int, gen: torch.Generator) -> list[int]:
        lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits
        out: list[int] = []
        while len(out) < count:
            cand = torch.randint(lo, hi, (2 * count,), generator=gen).tolist()
            # One- and two-digit numbers are too few to hold out: every one is trained.
            out += [n for n in cand if digits <= 2 or not is_heldout(n)]
        return out[:count]

    def _tensors(self, numbers: list[int]) -> tuple[torch.Tensor, ...]:
        src = torch.tensor([self.encode_source(n) for n in numbers])  # (B, S): one length
        tgts = [self.encode_target(n) for n in numbers]
        T = max(len(t) for t in tgts)
        tgt = torch.full((len(numbers), T), PAD, dtype=torch.long)  # (B, T), eos-terminated
        for i, t in enumerate(tgts):
            tgt[i, : len(t)] = torch.tensor(t)
        tgt_in = torch.cat([torch.full((len(numbers), 1), BOS), tgt[:, :-1]], dim=1)
        return src, tgt_in, tgt

    # ---- Task ---------------------------------------------------------------------------
    def model_io(self) -> dict[str, Any]:
        return {"src_vocab_size": len(self.src_vocab), "tgt_vocab_size": len(self.tgt_vocab)}

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "vocab": self.src_vocab,
            "target_vocab": self.tgt_vocab,
            "special_tokens": {"pad": PAD, "bos": BOS, "eos": EOS},
            "max_target_len": self.max_target,
            "source_tokens": "one per digit character",
            "target_tokens": "one per word, joined with spaces",
            "target_separator": " ",
        }

    def batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        digits = int(torch.randint(1, self.max_digits + 1, (1,), generator=gen))
        return self._tensors(self._sample_numbers(digits, batch_size, gen))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        src, tgt_in, tgt = batch
        logits = model(src, tgt_in)  # (B, T, V)
        return nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)

    @torch.no_grad()
    def translate(self, model: nn.Module, numbers: list[int]) -> list[str]:
        """Greedy decodes of numbers that share one digit count."""
        src = torch.tensor([self.encode_source(n) for n in numbers])
        if not isinstance(model, Seq2Seq):
            raise TypeError(f"num2words translates with a Seq2Seq, got {type(model).__name__}")
        out = model.greedy_decode(src, BOS, EOS, self.max_target)  # (B, <=max_target)
        return [self.decode_target(row) for row in out.tolist()]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Evaluation:
        hits = total = 0
        per_length: dict[str, float] = {}
        for d, numbers in enumerate(self.eval_numbers, start=1):
            got = self.translate(model, numbers)
            ok = sum(g == " ".join(number_words(n)) for g, n in zip(got, numbers, strict=True))
            per_length[str(d)] = ok / len(numbers)
            hits, total = hits + ok, total + len(numbers)
        # Baseline: a constant answer; every eval number is distinct, so it hits one at most.
        baseline = 1 / total
        return Evaluation(
            "exact_match",
            hits / total,
            baseline,
            "constant answer",
            higher_is_better=True,
            extra={"exact_match_by_digits": per_length, "heldout_numbers": total},
        )
