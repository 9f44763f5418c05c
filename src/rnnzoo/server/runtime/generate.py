"""Generation: token sampling, text <-> ids through a contract vocab, and the generation loops
(lm and seq2seq) that feed a model's graphs token by token through the runtime's batchers.

``Runtime.generate`` checks the request and picks the loop; the loops take a ``Feeder`` (the
batchers, the long-job pool, the serving check), nothing else of the runtime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from rnnzoo.errors import InvalidArgument

from .batching import Batcher
from .compute import Compute
from .repository import ServedEntry

State = dict[str, np.ndarray]


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


def decode(
    vocab: list[str] | None, ids: Iterable[int] | np.ndarray, model: str, sep: str = ""
) -> str:
    if not vocab:
        raise InvalidArgument(f"model {model!r} has no vocabulary to decode with")
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= len(vocab)):
        raise InvalidArgument(
            f"token ids must be integers in [0, {len(vocab)}) for {model!r}, got "
            f"{arr.tolist()[:20]}"
        )
    return sep.join(vocab[int(i)] for i in arr)


# ---- the generation loops ------------------------------------------------------------------
class Feeder:
    """What the generation loops need, passed in: the batchers (token by token, batched with
    other streams), the long-job pool (a long prompt) and the runtime's serving check."""

    def __init__(
        self,
        batchers: dict[tuple[str, str], Batcher],
        compute: Compute,
        long_job_steps: int,
        check: Callable[[], None],
    ) -> None:
        self.batchers = batchers
        self.compute = compute
        self.long_job_steps = long_job_steps
        self.check = check

    async def feed(
        self, role: str, entry: ServedEntry, key: object, ids: np.ndarray, state: State
    ) -> tuple[State, State]:
        """Run token ids (T,) through one graph from ``state``: (last-step outputs, state)."""
        graph = entry.graphs[role]
        chunk = graph.validate_chunk({graph.contract.inputs[0].name: ids})
        if chunk.length >= self.long_job_steps:  # a long prompt: not on the loop
            return await self.compute.long_chunk(graph, chunk, state, entry.info.streamable)
        return await self.batchers[(entry.info.name, role)].submit(key, chunk, state)

    @contextlib.contextmanager
    def generating(self, entry: ServedEntry, key: object) -> Iterator[None]:
        """A generation feeds its graphs step after step like a stream: attach its key, so
        a batch delay waits for it only while it has nothing queued (alone: never)."""
        batchers = [self.batchers[(entry.info.name, role)] for role in entry.graphs]
        for b in batchers:
            b.attach(key)
        try:
            yield
        finally:
            for b in batchers:
                b.detach(key)


async def generate_lm(
    feeder: Feeder,
    entry: ServedEntry,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    rng: np.random.Generator,
) -> AsyncIterator[str]:
    """Continue ``prompt`` with an lm: yield each sampled character until eos or ``max_tokens``."""
    graph = entry.graphs["model"]
    c = graph.contract
    ids = encode(c.vocab, prompt, c.name)
    if ids.size == 0:
        if "bos" not in c.special_tokens:
            raise InvalidArgument(f"model {c.name!r} needs a non-empty prompt (it has no bos)")
        ids = np.array([c.special_tokens["bos"]], np.int64)
    key = object()
    assert c.vocab is not None
    with feeder.generating(entry, key):
        eos = c.special_tokens.get("eos", -1)  # none: only max_tokens ends it
        loop = Sampling(temperature, top_k, rng, max_tokens, eos)
        async for tok in sample_loop(feeder, entry, "model", key, ids, graph.init_states, loop):
            yield c.vocab[tok]


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float
    top_k: int
    rng: np.random.Generator
    max_tokens: int
    eos: int  # never yielded; -1: none


async def sample_loop(
    feeder: Feeder,
    entry: ServedEntry,
    role: str,
    key: object,
    ids: np.ndarray,
    state: State,
    how: Sampling,
) -> AsyncIterator[int]:
    """Feed ``ids`` through graph ``role`` from ``state``, then each sampled token back in:
    yield token ids until ``eos`` (never yielded) or ``max_tokens``. Special tokens other
    than eos are never sampled. The one loop of both lm and seq2seq generation."""
    c = entry.graphs[role].contract
    logits_name = c.outputs[0].name
    banned = never_sampled(c.special_tokens)
    for _ in range(how.max_tokens):
        feeder.check()
        outs, state = await feeder.feed(role, entry, key, ids, state)
        tok = sample_token(outs[logits_name][-1], how.temperature, how.top_k, how.rng, banned)
        if tok == how.eos:
            return
        yield tok
        ids = np.array([tok], np.int64)


async def generate_seq2seq(
    feeder: Feeder,
    entry: ServedEntry,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    rng: np.random.Generator,
) -> AsyncIterator[str]:
    """Encode ``prompt``, then decode from bos: yield each sampled token until eos or
    ``max_tokens``."""
    enc, dec = entry.graphs["encoder"], entry.graphs["decoder"]
    src = encode(enc.contract.vocab, prompt, entry.info.name)
    if src.size == 0:
        raise InvalidArgument(f"seq2seq model {entry.info.name!r} needs a non-empty prompt")
    key = object()
    with feeder.generating(entry, key):
        _, enc_state = await feeder.feed("encoder", entry, key, src, enc.init_states)
        # encoder state outputs map by position onto decoder state inputs
        state = dict(dec.init_states)  # and a decoder's context windows start afresh
        for es, ds in zip(enc.contract.states, dec.contract.states, strict=True):
            state[ds.input] = np.moveaxis(enc_state[es.input], es.batch_axis, ds.batch_axis)
        vocab = dec.contract.target_vocab or dec.contract.vocab
        assert vocab is not None
        sep = dec.contract.target_separator
        special = dec.contract.special_tokens
        bos = np.array([special["bos"]], np.int64)
        how = Sampling(temperature, top_k, rng, max_tokens, special["eos"])
        n = 0
        async for tok in sample_loop(feeder, entry, "decoder", key, bos, state, how):
            yield (sep if n else "") + vocab[tok]
            n += 1
