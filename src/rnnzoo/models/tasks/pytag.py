"""Per-character tagging of Python source with the token class ``tokenize`` assigns.

Every character gets the class of the token that covers it: name, keyword, op, number,
string, comment, or other (whitespace, newlines, indentation). The future matters: the
``i`` of ``if`` and of ``items`` look the same until the next characters arrive, and so
does the ``f`` of ``f"..."``; a bidirectional tagger sees them, a unidirectional one must
guess. Training and held-out text are different stdlib files (sorted, disjoint).
"""

from __future__ import annotations

import functools
import io
import keyword
import token
import tokenize
from typing import Any

import torch
from torch import nn

from rnnzoo.models.tasks.base import Evaluation, Task, char_vocab, encode_chars
from rnnzoo.models.tasks.corpus import stdlib_corpus

LABELS = ["other", "name", "keyword", "op", "number", "string", "comment"]
_STRING_TYPES = {token.STRING} | {
    getattr(token, n)
    for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
    if hasattr(token, n)
}


def tag_source(text: str) -> list[int]:
    """Label id (index into ``LABELS``) of every character of ``text``.

    Raises ``tokenize.TokenError``/``SyntaxError`` for text that does not tokenize.
    """
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    tags = [0] * len(text)

    def offset(row: int, col: int) -> int:
        return line_starts[row - 1] + col if row - 1 < len(line_starts) else len(text)

    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == token.NAME:
            label = 2 if keyword.iskeyword(tok.string) else 1
        elif tok.type == token.OP:
            label = 3
        elif tok.type == token.NUMBER:
            label = 4
        elif tok.type in _STRING_TYPES:
            label = 5
        elif tok.type == token.COMMENT:
            label = 6
        else:
            continue  # NEWLINE, NL, INDENT, DEDENT, ENDMARKER: "other"
        start, end = offset(*tok.start), min(offset(*tok.end), len(text))
        tags[start:end] = [label] * (end - start)
    return tags


@functools.lru_cache(maxsize=4)
def _tagged(min_chars: int, skip_chars: int) -> tuple[str, tuple[int, ...], int]:
    """(text, tags, files) of the stdlib slice, skipping files that do not tokenize."""
    texts, tags, used = [], [], 0
    for _, text in stdlib_corpus(min_chars, skip_chars).files:
        try:
            file_tags = tag_source(text)
        except (tokenize.TokenError, SyntaxError):
            continue
        texts.append(text)
        tags.extend(file_tags)
        used += 1
    return "".join(texts), tuple(tags), used


class PyTag(Task):
    name = "pytag"
    kind = "tag"
    description = "token class (tokenize) of every character of Python source"

    def __init__(
        self,
        train_chars: int = 500_000,
        eval_chars: int = 60_000,
        seq_len: int = 128,
        min_count: int = 3,
    ) -> None:
        text, tags, n_train = _tagged(train_chars, 0)
        held_text, held_tags, n_held = _tagged(eval_chars, train_chars)
        self.vocab = char_vocab(text, min_count=min_count)
        self.train_ids = encode_chars(text, self.vocab)  # (N,)
        self.train_tags = torch.tensor(tags, dtype=torch.long)  # (N,)
        self.seq_len = seq_len
        rows = len(held_text) // seq_len  # independent windows of seq_len characters
        assert rows > 0, "held-out text shorter than one window"
        keep = rows * seq_len
        self.eval_ids = encode_chars(held_text[:keep], self.vocab).view(rows, seq_len)
        self.eval_tags = torch.tensor(held_tags[:keep], dtype=torch.long).view(rows, seq_len)
        counts = torch.bincount(self.train_tags, minlength=len(LABELS))
        self.majority = int(counts.argmax())
        self.files = {"train": n_train, "heldout": n_held}

    def model_io(self) -> dict[str, Any]:
        return {"vocab_size": len(self.vocab), "output_size": len(LABELS)}

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "vocab": self.vocab, "unk": 0, "labels": list(LABELS)}

    def batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        T = self.seq_len
        starts = torch.randint(0, self.train_ids.numel() - T, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(T)  # (B, T)
        return self.train_ids[idx], self.train_tags[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        logits, _ = model(x)  # (B, T, C)
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Evaluation:
        correct = 0
        for s in range(0, self.eval_ids.shape[0], 256):
            logits, _ = model(self.eval_ids[s : s + 256])  # (b, T, C)
            correct += int((logits.argmax(-1) == self.eval_tags[s : s + 256]).sum())
        acc = correct / self.eval_tags.numel()
        majority = float((self.eval_tags == self.majority).float().mean())
        return Evaluation(
            "accuracy",
            acc,
            majority,
            f"majority class ({LABELS[self.majority]})",
            higher_is_better=True,
            extra={"heldout_chars": self.eval_tags.numel(), "files": self.files},
        )
