"""Generation helpers (numpy): token sampling and text <-> ids through a contract vocab."""

from __future__ import annotations

import numpy as np

from rnnzoo.errors import InvalidArgument


def check_sampling(
    max_tokens: int, temperature: float, top_k: int, seed: int | None = None
) -> None:
    if max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be >= 1, got {max_tokens}")
    if not np.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    if seed is not None and seed < 0:
        raise InvalidArgument(f"seed must be >= 0 (or unset for a fresh one), got {seed}")


def never_sampled(special_tokens: dict[str, int]) -> list[int]:
    """Special ids a generation must not emit: all but ``eos`` (which ends it). A pad or bos
    token in generated text is never what a user wants, however likely the model finds it."""
    return sorted(i for name, i in special_tokens.items() if name != "eos")


def sample_token(
    logits: np.ndarray,
    temperature: float,
    top_k: int,
    rng: np.random.Generator,
    banned: list[int] | None = None,
) -> int:
    """One id from logits (V,). temperature 0 -> argmax; top_k > 0 keeps the k best;
    ``banned`` ids are never returned."""
    assert logits.ndim == 1
    z = logits.astype(np.float64)
    if banned:
        z[banned] = -np.inf
    if temperature == 0:
        return int(np.argmax(z))
    # Shift before dividing: a tiny temperature then sends every other logit to -inf
    # (probability 0) instead of overflowing the best one to inf (NaN probabilities).
    with np.errstate(over="ignore", invalid="ignore"):
        z = (z - z.max()) / temperature
    z[np.isnan(z)] = -np.inf
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def encode(vocab: list[str] | None, text: str, model: str) -> np.ndarray:
    """Characters -> ids (T,) int64 with the single-character entries of ``vocab``."""
    if not vocab:
        raise InvalidArgument(f"model {model!r} has no vocabulary; it takes numbers, not text")
    index = {s: i for i, s in enumerate(vocab) if len(s) == 1}
    unknown = sorted({ch for ch in text if ch not in index})
    if unknown:
        shown = unknown[:16] + ([f"... {len(unknown) - 16} more"] if len(unknown) > 16 else [])
        raise InvalidArgument(
            f"characters {shown} are not in the vocabulary of {model!r}; "
            f"it knows {''.join(sorted(index))!r}"
        )
    return np.array([index[ch] for ch in text], dtype=np.int64)


def decode(vocab: list[str] | None, ids, model: str, sep: str = "") -> str:
    if not vocab:
        raise InvalidArgument(f"model {model!r} has no vocabulary to decode with")
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= len(vocab)):
        raise InvalidArgument(
            f"token ids must be integers in [0, {len(vocab)}) for {model!r}, got "
            f"{arr.tolist()[:20]}"
        )
    return sep.join(vocab[int(i)] for i in arr)
