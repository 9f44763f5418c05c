"""Character language model on Python source (the standard library's own ``.py`` files).

The corpus (>= 1 MB, sorted files, hash recorded) is split by position: the last
``heldout_frac`` of the text is held out. The metric is bits per character on held-out
text, read with the state carried across chunks, against the unigram baseline (character
frequencies of the training text, add-one smoothed) on the same text.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rnnzoo.models.tasks.base import Evaluation, Task, char_vocab, encode_chars
from rnnzoo.models.tasks.corpus import stdlib_corpus


class CharLM(Task):
    name = "charlm"
    kind = "lm"
    description = "next character of Python source code (stdlib .py files)"

    def __init__(
        self,
        corpus_chars: int = 1_200_000,
        heldout_frac: float = 0.05,
        seq_len: int = 128,
        eval_chars: int = 40_000,
        eval_rows: int = 16,
        min_count: int = 3,
    ) -> None:
        assert 0 < heldout_frac < 0.5
        corpus = stdlib_corpus(corpus_chars)
        text = corpus.text
        cut = int(len(text) * (1 - heldout_frac))
        train_text, held_text = text[:cut], text[cut:]
        self.corpus = corpus.describe()
        self.vocab = char_vocab(train_text, min_count=min_count)
        self.train_ids = encode_chars(train_text, self.vocab)  # (N,)
        held = encode_chars(held_text, self.vocab)[:eval_chars]
        self.eval_rows = eval_rows
        cols = held.numel() // eval_rows
        assert cols > 1, "held-out text too short for eval_rows"
        self.eval_ids = held[: eval_rows * cols].view(eval_rows, cols)  # (R, C)
        self.seq_len = seq_len
        counts = torch.bincount(self.train_ids, minlength=len(self.vocab)).double() + 1.0
        self.unigram_logp = (counts / counts.sum()).log()  # (V,) add-one smoothed

    def model_io(self) -> dict[str, Any]:
        v = len(self.vocab)
        return {"vocab_size": v, "output_size": v}

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "vocab": self.vocab, "unk": 0, "corpus": self.corpus}

    def batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        T = self.seq_len
        starts = torch.randint(0, self.train_ids.numel() - T - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(T + 1)  # (B, T+1)
        chunk = self.train_ids[idx]
        return chunk[:, :-1], chunk[:, 1:]  # x, y: (B, T)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        logits, _ = model(x)  # (B, T, V)
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def sample(
        self, model: nn.Module, prompt: str, n: int, temperature: float = 1.0, seed: int = 0
    ) -> str:
        """``sample`` with this task's vocabulary."""
        return sample(model, self.vocab, prompt, n, temperature, seed)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Evaluation:
        ids, state, nll, n = self.eval_ids, None, 0.0, 0
        for s in range(0, ids.shape[1] - 1, self.seq_len):  # carry the state across chunks
            x = ids[:, s : s + self.seq_len]
            y = ids[:, s + 1 : s + 1 + self.seq_len]
            x = x[:, : y.shape[1]]
            logits, state = model(x, state)
            nll += float(
                nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
            )
            n += y.numel()
        bpc = nll / n / math.log(2)
        targets = ids[:, 1:].flatten()
        unigram = float(-self.unigram_logp[targets].mean()) / math.log(2)
        return Evaluation("bpc", bpc, unigram, "unigram", higher_is_better=False)


@torch.no_grad()
def sample(
    model: nn.Module,
    vocab: list[str],
    prompt: str,
    n: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` by ``n`` characters; ``temperature`` 0 picks the most likely one."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if not prompt:
        raise ValueError("prompt must hold at least one character")
    gen = torch.Generator().manual_seed(seed)
    ids = encode_chars(prompt, vocab)[None]  # (1, P)
    logits, state = model(ids)
    out: list[str] = []
    for _ in range(n):
        last = logits[0, -1].double()  # (V,)
        if temperature == 0:
            tok = int(last.argmax())
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            tok = int(torch.multinomial(probs, 1, generator=gen))
        out.append(vocab[tok])
        logits, state = model(torch.tensor([[tok]]), state)
    return "".join(out)
