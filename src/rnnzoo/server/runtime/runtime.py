"""The runtime facade: everything the transport calls. Plain Python + numpy.

Semantics worth knowing:
- every request is validated before it touches a session; a bad request changes nothing;
- steps of one session run in order (a per-session FIFO lock); a step's new state is stored
  only after its ORT call succeeded, and only if the session was not reset meanwhile;
- streamable models: a step returns the outputs of its own chunk (``start`` = steps before
  it, ``revised=False``);
- non-streamable (bidirectional) models: the session buffers the chunks received so far and
  each step re-runs the whole prefix from the initial state, returning exact outputs for all
  of it (``start=0``, ``revised=True``): equal to offline inference of that prefix. A prefix
  longer than ``max_buffer_steps`` is refused with ResourceExhausted: it is a server-set
  resource limit, not a state problem of the request; the client can reset or close the
  session and start a new sequence;
- inference runs in the batcher: small batches inline on the event loop (cheaper than a
  thread hand-over), big ones in a thread pool (see batching.py);
- long work (``long_job_steps`` or more: a long Infer or Stream chunk, a bidirectional
  prefix recompute, a long prompt) never runs on the event loop: it goes to the long-job
  pool (``jobs.py``), low-priority threads shared round-robin across callers, a streamable
  sequence sliced along time with its state carried; capped (ResourceExhausted beyond);
- ownership and quotas follow the caller the transport sets (``caller.py``).
- every cost is bounded before compute (``RuntimeOptions``, table in docs/limits.md): steps
  per request, output bytes (predicted from the contract), buffered steps, generated tokens;
- a request answered with an error changes nothing: every change of a session is one
  ``Transaction`` (transaction.py): own, lock, compute, persist through the state store before
  the response goes out, commit when the caller's block ends without an error;
- ownership: a stream holds its session's lease (``lease.py``, in the store); Infer(advance),
  reset and close on a session leased by a live stream, in any process, are
  FailedPrecondition naming the attachment (core.py);
- every session is in the state store (``store/``: in memory without ``--state-store``;
  ``durable.py``): snapshot, restore and fork; a request may carry its expected position, and
  a chunk already applied gets its kept result again (``StepResult.replayed``), whichever RPC
  applied it; KServe sequences are sessions of the store too (sequences.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from rnnzoo.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

from .batchers import Batchers
from .batching import Batcher
from .catalog import Catalog
from .compute import Compute
from .core import SessionCore
from .durable import Records
from .generate import (
    Feeder,
    check_sampling,
    decode,
    encode,
    generate_lm,
    generate_seq2seq,
)
from .lease import Lease, new_holder
from .model import Chunk
from .options import RuntimeOptions, StepResult
from .redact import clip, sid_tag
from .repository import LoadOptions, ModelInfo, ModelRepository
from .sequences import Sequences
from .session_ops import SessionOps
from .sessions import SessionInfo, SessionStore
from .snapshot import Snapshot
from .stepping import Prepared, Stepper, with_batch
from .store import StateStore, open_store
from .transaction import Transaction


class Runtime:
    """The facade: lifecycle, models, and the session core's operations (core.py), each
    with its collaborators passed in: ``SessionStore`` (this process's sessions and leases),
    ``Records`` (the state store's side), ``Stepper`` (what a step computes), ``SessionOps``
    (create, restore, fork, close, reset), ``Sequences`` (KServe sequences)."""

    def __init__(
        self,
        repo: ModelRepository,
        options: RuntimeOptions | None = None,
        clock: Callable[[], float] | None = None,
        state_store: StateStore | None = None,
    ) -> None:
        self.options = options or RuntimeOptions()
        self.options.check()
        self.repo = repo
        o = self.options
        self.compute = Compute(o, self._check)  # the ORT and long-job pools
        self.jobs, self.trimmer = self.compute.jobs, self.compute.trimmer
        self.catalog = Catalog(repo, o, self.trimmer)
        kw: dict[str, Any] = {"clock": clock} if clock is not None else {}
        if state_store is None:
            state_store = open_store(o.state_store, **kw)
        self.state_store = state_store
        self.sessions = SessionStore(
            o.max_sessions,
            o.on_full,
            o.session_ttl_s,
            lease_ttl_s=o.lease_ttl_s,
            max_per_client=o.max_sessions_per_client or None,
            state=state_store,
            **kw,
        )
        # (model or version key, role) -> its graph's batcher; versions that come while
        # serving get theirs on first use (batchers.py)
        self.batchers = Batchers(
            repo, lambda graph: Batcher(graph, self.compute.executor, o.max_batch, o.max_delay_ms)
        )
        self.records = Records(self.sessions, state_store, self.catalog, o.lease_ttl_s)
        self.core = SessionCore(self.sessions, self.records, self.batchers, self._check)
        self.stepper = Stepper(self.catalog, self.batchers, self.compute, o)
        self.ops = SessionOps(self.core, self.catalog, self.stepper)
        self.sequences = Sequences(
            self.core, self.ops, self.stepper, self.catalog, self._infer_stateless
        )
        self.generator = Feeder(self.batchers, self.compute, o.long_job_steps, self._check)
        self._phase = "new"  # new -> running -> stopping -> stopped
        self._sweeper: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        options: RuntimeOptions | None = None,
        load: LoadOptions | None = None,
    ) -> Runtime:
        opts = options or RuntimeOptions()
        opts.check()
        ld = load or LoadOptions()
        repo = ModelRepository.from_dir(
            model_dir,
            opts.intra_op_threads,
            opts.inter_op_threads,
            allow_failed_parity=ld.allow_failed_parity,
            strict=ld.strict,
            control=ld.control,
        )
        return cls(repo, opts)

    def cap_output_bytes(self, limit: int) -> None:
        """Responses must fit a message: refuse outputs over ``limit`` bytes (the options
        stay as given; the lower of the two applies)."""
        self.catalog.max_output_bytes = max(1, min(self.options.max_output_bytes, limit))

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._phase != "new":
            raise FailedPrecondition(f"the runtime is {self._phase}; create a new one to restart")
        self.batchers.start()
        # Always: sessions may ask for a TTL even when the server has none.
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())
        self._phase = "running"

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._phase in ("stopping", "stopped"):
            return
        self._phase = "stopping"
        await asyncio.gather(*(b.stop(grace_s) for b in self.batchers.values()))
        for task in (self._sweeper, self._renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.compute.shutdown()
        await self.records.close([lease for lease, _, _ in self.core.streams.values()])
        self._phase = "stopped"

    @property
    def ready(self) -> bool:
        return self._phase == "running"

    def _check(self) -> None:
        if self._phase != "running":
            raise Unavailable(
                f"the runtime is {self._phase}, not serving; retry against a running server"
            )

    async def _sweep_loop(self) -> None:
        # A quarter of the server's TTL (at most sweep_interval_s). A session with a shorter
        # TTL of its own may be freed up to one interval late; it answers NotFound on its first
        # access after its TTL either way (every access checks).
        interval = self.options.sweep_interval_s
        if self.sessions.ttl_s is not None:
            interval = min(interval, max(self.sessions.ttl_s / 4, 0.05))
        while True:
            await asyncio.sleep(interval)
            self.sessions.sweep()

    async def _renew_loop(self) -> None:
        """Renew the leases of streams that are alive, three times per lease TTL: a stream
        whose call is over (e.g. its peer died) stops being renewed even if its handler is
        still stuck somewhere, and its session frees when the lease runs out."""
        while True:
            await asyncio.sleep(self.options.lease_ttl_s / 3)
            renewed = self.core.renew_local()
            with contextlib.suppress(Exception):  # unreachable: the leases run out
                await self.sessions.leases.renew_in_store(renewed)

    def renew_leases(self) -> int:
        return len(self.core.renew_local())

    # ---- limits and models -----------------------------------------------------------------
    def check_steps(self, n: int, what: str) -> None:
        self.catalog.check_steps(n, what)

    def list_models(self) -> list[ModelInfo]:
        self._check()
        return self.repo.list()

    def get_model(self, name: str) -> ModelInfo:
        self._check()
        return self.catalog.entry(name).info

    # ---- sessions ----------------------------------------------------------------------------
    async def create_session(
        self,
        model: str,
        initial_state: dict[str, np.ndarray] | None = None,
        ttl_s: float | None = None,
        snapshot: Snapshot | None = None,
    ) -> SessionInfo:
        """A new session, in the state store. ``ttl_s``: its own idle expiry, at most the
        server's (None: the server's); ``snapshot``: a restore."""
        sess = await self.ops.create(model, initial_state, ttl_s, snapshot)
        return self.sessions.info(sess)

    def restore_snapshot(self, snap: Snapshot) -> Snapshot:
        return self.ops.restore_snapshot(snap)

    async def snapshot_session(
        self, session_id: str
    ) -> tuple[Snapshot, dict[str, np.ndarray], dict[str, np.ndarray], list[Any]]:
        return await self.ops.snapshot(session_id)

    async def fork_session(self, session_id: str, ttl_s: float | None = None) -> SessionInfo:
        return self.sessions.info(await self.ops.fork(session_id, ttl_s))

    async def close_session(self, session_id: str, lease: Lease | None = None) -> None:
        """Close; FailedPrecondition while a stream other than ``lease``'s is attached."""
        await self.ops.close(session_id, lease)

    async def reset_session(self, session_id: str, lease: Lease | None = None) -> None:
        """Back to the initial state; FailedPrecondition while another stream is attached."""
        await self.ops.reset(session_id, lease)

    async def attach(
        self, session_id: str, holder: str | None = None, alive: Callable[[], bool] | None = None
    ) -> Lease:
        """Take the session's lease for ``holder`` (a stream), in the store. ``alive()``:
        whether that stream still lives (the runtime renews the lease while it does)."""
        return await self.core.attach(session_id, holder or new_holder(), alive)

    def detach(self, session_id: str, lease: Lease) -> None:
        self.core.detach(session_id, lease)

    async def released(self) -> None:
        await self.core.released()

    def session_info(self, session_id: str) -> SessionInfo:
        return self.ops.info(session_id)

    # ---- stepping ----------------------------------------------------------------------------
    async def step(
        self,
        session_id: str,
        inputs: dict[str, np.ndarray],
        lease: Lease | None = None,
        position: int | None = None,
    ) -> StepResult:
        """One chunk, committed at once (see ``stepping``)."""
        async with self.stepping(session_id, inputs, lease, position) as result:
            return result

    def stepping(
        self,
        session_id: str,
        inputs: dict[str, np.ndarray],
        lease: Lease | None = None,
        position: int | None = None,
        queued: bool = False,
    ) -> Transaction[Prepared]:
        """``async with rt.stepping(...) as result``: one chunk as a session transaction
        (transaction.py). ``lease``: the calling stream's lease; ``position``: the steps the
        request expects before its chunk (a retry of the last one gets its result again).
        A caller that sends the response calls ``await result.persist()`` first.
        ``queued``: for ``transaction.enter_all`` (many sessions' chunks at once)."""
        # touched now only when queued: ``enter_all`` then takes this copy (same loop turn);
        # otherwise the transaction looks the session up again inside its lock
        sess = self.sessions.get(session_id, touch=queued)
        p = self.stepper.prepare(sess.model, inputs)  # before anything is queued or locked
        what = "a step from outside it"
        # queued (StepMany, entered with ``enter_all``): the batcher job is queued as the
        # transaction starts its computation, not when that is awaited
        compute = self.stepper.chunk_soon if queued else self.stepper.chunk
        return Transaction(self.core, session_id, lease, position, compute, p, what, sess=sess)

    async def _infer_stateless(
        self, model: str, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        return await self.infer(model, inputs)

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        session_id: str | None = None,
        advance: bool = False,
        position: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Whole-sequence inference (outputs with their batch axis): stateless, or from a
        session's state (read only), or advancing it (``advancing``, committed at once)."""
        if advance:
            if session_id is None:
                raise InvalidArgument("advance=True needs a session_id (whose state to move on)")
            async with self.advancing(model, inputs, session_id, position) as res:
                return self.batched(model, res.outputs)
        self._check()
        if position is not None:
            raise InvalidArgument("position is for requests that advance the session")
        _, graph = self.catalog.single(model, "infer")
        feeds, batch, length = self._feeds(graph, inputs)
        if session_id is None:
            states = graph.initial_batch_state(batch)
            outs, _ = await self.compute.run(
                graph, feeds, states, batch, length, self.catalog.entry(model).info.streamable
            )
            return outs
        sess = await self.records.fresh(session_id)
        self._session_infer(sess.model, model, session_id, batch)
        async with sess.lock:
            sess = self.sessions.get(session_id)
            outs, _ = await self.compute.run(graph, feeds, sess.state, 1, length, True)
        return outs

    def _feeds(
        self, graph: Any, inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], int, int]:
        feeds, batch = graph.validate_batch(inputs)
        length = graph.feed_steps(graph.contract, feeds)
        self.catalog.check_steps(batch * length, "this request (batch x time)")
        self.catalog.check_output(graph, batch, length, "this request")
        return feeds, batch, length

    def _session_infer(self, have: str, model: str, session_id: str, batch: int) -> None:
        name, _, version = have.rpartition("@")  # its version's key (repository.py)
        if have != model and name != model:
            raise InvalidArgument(
                f"session {sid_tag(session_id)} belongs to model {name or have!r}"
                + (f" version {version}" if name else "")
                + f", not {clip(model)!r}"
            )
        if batch != 1:
            raise InvalidArgument(
                f"inference from session {sid_tag(session_id)} takes batch size 1, got {batch}"
            )
        if not self.catalog.entry(model).info.streamable:
            raise FailedPrecondition(
                f"model {model!r} is not streamable (bidirectional): it has no running state "
                "to continue from; use step (exact revised outputs) or infer without a session"
            )

    def advancing(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        session_id: str,
        position: int | None = None,
    ) -> Transaction[tuple[dict[str, np.ndarray], int]]:
        """Infer(advance=true) as a session transaction: yields the StepResult (batch-free
        outputs: ``batched`` re-adds the axis); the session moves on when the ``async with``
        block ends without an error. ``position`` deduplicates as in ``stepping``."""
        self._check()
        _, graph = self.catalog.single(model, "infer")
        feeds, batch, length = self._feeds(graph, inputs)
        sess = self.sessions._live.get(session_id)
        if sess is not None:  # (one not cached here is checked once read, below)
            self._session_infer(sess.model, model, session_id, batch)
        check = self._session_infer

        async def compute(s: Any, arg: tuple[dict[str, np.ndarray], int]) -> Any:
            check(s.model, model, session_id, batch)
            return await self.stepper.advance(s, arg)

        what = "Infer(advance=true)"
        return Transaction(self.core, session_id, None, position, compute, (feeds, length), what)

    def batched(self, model: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A session's batch-free outputs -> with the batch axis of 1 a batched request has."""
        return with_batch(self.catalog.entry(model).graphs["model"].contract, outputs)

    # ---- text and generation ---------------------------------------------------------------
    def _text_vocabs(self, model: str) -> tuple[list[str] | None, list[str] | None]:
        entry = self.catalog.entry(model)
        if entry.is_seq2seq:
            enc, dec = entry.graphs["encoder"].contract, entry.graphs["decoder"].contract
            return enc.vocab, dec.target_vocab or dec.vocab
        c = entry.graphs["model"].contract
        return c.vocab, c.vocab

    def encode_text(self, model: str, text: str) -> np.ndarray:
        self._check()
        self.check_steps(len(text), "this text")  # before a per-character walk
        return encode(self._text_vocabs(model)[0], text, model)

    def decode_tokens(self, model: str, ids: Iterable[int] | np.ndarray) -> str:
        self._check()
        entry = self.catalog.entry(model)
        sep = entry.graphs["decoder"].contract.target_separator if entry.is_seq2seq else ""
        return decode(self._text_vocabs(model)[1], ids, model, sep)

    async def generate(
        self,
        model: str,
        prompt: str,
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> AsyncIterator[str]:
        """Yield text pieces as they are sampled. lm: continue ``prompt``; seq2seq: encode
        ``prompt``, decode from bos until eos or ``max_tokens``. An async generator: argument
        errors are raised on the first ``__anext__``."""
        self._check()
        check_sampling(max_tokens, temperature, top_k, seed)
        if max_tokens > self.options.max_generate_tokens:
            raise ResourceExhausted(
                f"max_tokens={max_tokens} is over this server's limit of "
                f"{self.options.max_generate_tokens} generated tokens per request "
                f"(max_generate_tokens); ask for at most {self.options.max_generate_tokens} "
                "and continue from the text so far"
            )
        self.check_steps(len(prompt), "this prompt")
        entry = self.catalog.entry(model)
        rng = np.random.default_rng(seed)
        feeder = self.generator
        if entry.is_seq2seq:
            gen = generate_seq2seq(feeder, entry, prompt, max_tokens, temperature, top_k, rng)
        elif entry.info.task == "lm" and entry.graphs["model"].contract.vocab:
            gen = generate_lm(feeder, entry, prompt, max_tokens, temperature, top_k, rng)
        else:
            raise FailedPrecondition(
                f"model {clip(model)!r} (task {entry.info.task!r}) does not generate text; "
                "generate serves lm and seq2seq models"
            )
        async for piece in gen:
            yield piece


__all__ = ["Chunk", "ModelInfo", "Runtime", "RuntimeOptions", "SessionInfo", "StepResult"]
