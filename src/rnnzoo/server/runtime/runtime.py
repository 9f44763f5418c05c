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
- a request answered with an error changes nothing: ``stepping``/``inferring`` hand the
  result to the caller inside the session's lock and commit the new state only when the
  caller's block ends without an error (the response went out);
- ownership: a stream holds its session's lease (``lease.py``); Infer(advance), reset and
  close on a session leased by a live stream are FailedPrecondition.
- durable sessions (``options.state_store``; ``durable.py``, ``store.py``): snapshot, restore
  and fork; every state change is written through the store (fenced by the lease epoch)
  before its response goes out; a request may carry its expected position, and a chunk
  already applied gets its stored response again (``StepResult.replay``). The ``a*``
  coroutines (``acreate_session``, ``aattach``, ``aclose_session``, ``areset_session``) are
  the store-aware forms of the plain methods, which stay per process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np

from rnnzoo.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

from .batching import Batcher
from .compute import Compute
from .durable import Durability
from .generate import check_sampling, decode, encode, generate_lm, generate_seq2seq
from .lease import Lease
from .memory import LARGE_STEPS
from .model import Chunk, ServedModel
from .options import Outputs, RuntimeOptions, StepResult
from .redact import clip, sid_tag
from .repository import ModelInfo, ModelRepository, ServedEntry
from .session_ops import SessionOps
from .sessions import Session, SessionInfo, SessionStore
from .stepping import Stepping
from .store import StateStore, open_store


class Runtime(SessionOps):
    """The facade: lifecycle, limits, models, stepping and inference; session management is
    ``SessionOps`` (session_ops.py), where the computing runs ``Compute`` (compute.py), the
    generation loops generate.py."""

    def __init__(
        self,
        repo: ModelRepository,
        options: RuntimeOptions | None = None,
        clock=None,
        state_store: StateStore | None = None,
    ):
        self.options = options or RuntimeOptions()
        self.options.check()
        self.repo = repo
        kw = {"clock": clock} if clock is not None else {}
        self.store = SessionStore(
            self.options.max_sessions,
            self.options.on_full,
            self.options.session_ttl_s,
            lease_ttl_s=self.options.lease_ttl_s,
            max_per_client=self.options.max_sessions_per_client or None,
            **kw,
        )
        self.compute = Compute(self.options, self._check)  # the ORT and long-job pools
        self.jobs, self.trimmer = self.compute.jobs, self.compute.trimmer
        self.batchers: dict[tuple[str, str], Batcher] = {}
        for name, entry in repo.entries.items():
            for role, graph in entry.graphs.items():
                self.batchers[(name, role)] = Batcher(
                    graph, self.compute.executor, self.options.max_batch, self.options.max_delay_ms
                )
        # session id -> (its stream's lease, its batcher, is the stream alive?): a batcher's
        # delay waits only for streams; the renewer renews the leases of live streams
        self._streams: dict[str, tuple[Lease, Batcher | None, Callable[[], bool] | None]] = {}
        self._phase = "new"  # new -> running -> stopping -> stopped
        self._sweeper: asyncio.Task | None = None
        self._renewer: asyncio.Task | None = None
        if state_store is None:
            state_store = open_store(self.options.state_store)
        self.durable = Durability(self, state_store)

    @classmethod
    def from_dir(cls, model_dir: str | Path, options: RuntimeOptions | None = None) -> Runtime:
        opts = options or RuntimeOptions()
        opts.check()
        repo = ModelRepository.from_dir(model_dir, opts.intra_op_threads, opts.inter_op_threads)
        return cls(repo, opts)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._phase != "new":
            raise FailedPrecondition(f"the runtime is {self._phase}; create a new one to restart")
        for b in self.batchers.values():
            b.start()
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
        await self.durable.close()
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
        if self.store.ttl_s is not None:
            interval = min(interval, max(self.store.ttl_s / 4, 0.05))
        while True:
            await asyncio.sleep(interval)
            self.store.sweep()

    async def _renew_loop(self) -> None:
        """Renew the leases of streams that are alive, three times per lease TTL: a stream
        whose call is over (e.g. its peer died) stops being renewed even if its handler is
        still stuck somewhere, and its session frees when the lease runs out."""
        while True:
            await asyncio.sleep(self.options.lease_ttl_s / 3)
            renewed = self._renew_local()
            if self.durable.store is not None:
                with contextlib.suppress(Exception):  # unreachable: the leases run out
                    await self.store.leases.renew_in_store(renewed)

    def renew_leases(self) -> int:
        return len(self._renew_local())

    def _renew_local(self) -> list[Lease]:
        """Renew the leases of live streams here; returns them (the store renews them too)."""
        renewed = []
        for lease, _, alive in list(self._streams.values()):
            if (alive is None or alive()) and self.store.leases.renew(lease):
                renewed.append(lease)
        return renewed

    # ---- limits --------------------------------------------------------------------------------
    def check_steps(self, n: int, what: str) -> None:
        """``what`` (e.g. "this chunk") has ``n`` steps: refuse it over max_request_steps."""
        limit = self.options.max_request_steps
        if n >= LARGE_STEPS:  # a big request message was decoded, allowed or not
            self.trimmer.soon()
        if n > limit:
            raise ResourceExhausted(
                f"{what} has {n} steps, over this server's limit of {limit} steps per request "
                f"(max_request_steps); send at most {limit} steps per request (split long "
                "sequences into chunks and stream them through a session)"
            )

    def _check_output(self, graph: ServedModel, batch: int, steps: int, what: str) -> None:
        """Refuse a call whose outputs (predicted from the contract) would exceed
        max_output_bytes, before anything runs."""
        limit = self.options.max_output_bytes
        size = graph.output_bytes(batch, steps)
        if size > limit:
            per_step = max(1, graph.output_bytes(batch, 1) - graph.output_bytes(batch, 0))
            fit = max(0, (limit - graph.output_bytes(batch, 0)) // per_step)
            raise ResourceExhausted(
                f"{what} would return {size} bytes of outputs ({batch} sequence(s) x {steps} "
                f"steps of model {graph.contract.name!r}), over this server's limit of "
                f"{limit} bytes per response (max_output_bytes); send at most {fit} steps "
                f"per request{'' if batch == 1 else ' at this batch size'}"
            )

    def _entry(self, name: str) -> ServedEntry:
        entry = self.repo.entries.get(name)
        if entry is None and name in self.repo.failed:
            raise FailedPrecondition(
                f"model {clip(name)!r} is not ready: it failed to load ({self.repo.failed[name]}); "
                "the server's log has the details"
            )
        if entry is None:
            raise NotFound(f"no model {clip(name)!r}; known models: {sorted(self.repo.entries)}")
        return entry

    # ---- models ----------------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        self._check()
        return self.repo.list()

    def get_model(self, name: str) -> ModelInfo:
        self._check()
        return self._entry(name).info

    def _single(self, name: str, what: str) -> tuple[ServedEntry, ServedModel]:
        entry = self._entry(name)
        if entry.is_seq2seq:
            raise FailedPrecondition(
                f"model {clip(name)!r} is a seq2seq encoder/decoder pair; {what} serves single-graph "
                "models: use generate for it"
            )
        return entry, entry.graphs["model"]

    # ---- stepping ----------------------------------------------------------------------------
    async def step(
        self, session_id: str, inputs: dict[str, np.ndarray], lease: Lease | None = None
    ) -> StepResult:
        """One chunk, committed at once (see ``stepping``)."""
        async with self.stepping(session_id, inputs, lease) as result:
            return result

    def _check_lease(self, session_id: str, lease: Lease | None) -> None:
        if lease is None:
            self._not_held(session_id, "a step from outside it")
        elif not self.store.leases.renew(lease):
            raise FailedPrecondition(
                f"this stream's lease on session {sid_tag(session_id)} ran out (the stream "
                "was not renewing it) and may have moved to another stream; open a new stream "
                "to resume the session"
            )

    def stepping(
        self,
        session_id: str,
        inputs: dict[str, np.ndarray],
        lease: Lease | None = None,
        position: int | None = None,
    ) -> Stepping:
        """``async with rt.stepping(...) as result``: compute one chunk and yield its
        ``StepResult`` inside the session's lock; the new state is committed when the block
        ends without an error (the caller sent the response), and not at all otherwise.
        ``lease``: the calling stream's lease; ``position``: the steps the request expects
        before its chunk (deduplication). A caller that sends the response calls
        ``await result.persist(encode)`` first (see stepping.py)."""
        return Stepping(self, session_id, inputs, lease, position)

    async def _persist(
        self,
        sess: Session,
        epoch: int,
        lease: Lease | None,
        state: dict,
        steps: int,
        buffer: list | None,
        resp: bytes | None,
        rpos: int,
    ) -> None:
        """Write a step's new state (and its response) through the store, fenced."""
        self._check_epoch(sess, epoch)
        if lease is not None and not self.store.leases.current(lease):
            self._check_lease(sess.id, lease)  # raises: the lease ran out
        if not sess.durable or self.durable.store is None:
            return
        snap = self.durable.snapshot(sess)
        snap.state, snap.steps = state, steps
        if buffer is not None:
            snap.buffer = buffer
        await self.durable.write(sess, snap, lease, resp, rpos)

    @staticmethod
    def _check_epoch(sess: Session, epoch: int) -> None:
        if sess.epoch != epoch:
            raise FailedPrecondition(
                f"session {sid_tag(sess.id)} was reset or closed while this step ran; "
                "its result was dropped, send the chunk again"
            )

    def _may_commit(self, sess: Session, epoch: int, lease: Lease | None) -> bool:
        """Still the same session generation, and (fencing) still this stream's lease."""
        return sess.epoch == epoch and (lease is None or self.store.leases.current(lease))

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        session_id: str | None = None,
        advance: bool = False,
    ) -> dict[str, np.ndarray]:
        """Whole-sequence inference, committed at once (see ``inferring``)."""
        async with self.inferring(model, inputs, session_id, advance) as outputs:
            return outputs

    @contextlib.asynccontextmanager
    async def inferring(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        session_id: str | None = None,
        advance: bool = False,
        position: int | None = None,
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """Yield the outputs (an ``Outputs`` dict); with ``advance``, the session moves on
        when the ``async with`` block ends without an error, and not otherwise. With
        ``advance``, ``position`` deduplicates as in ``stepping`` and the caller may
        ``await outputs.persist(encode)`` before sending (write-through; ``encode()`` returns
        the response's bytes, called only when they are kept)."""
        self._check()
        _, graph = self._single(model, "infer")
        feeds, batch = graph.validate_batch(inputs)
        length = graph.feed_steps(graph.contract, feeds)
        self.check_steps(batch * length, "this request (batch x time)")
        self._check_output(graph, batch, length, "this request")
        streamable = self._entry(model).info.streamable
        if session_id is None:
            if advance:
                raise InvalidArgument("advance=True needs a session_id (whose state to move on)")
            states = graph.initial_batch_state(batch)
            outs, _ = await self.compute.run(graph, feeds, states, batch, length, streamable)
            yield Outputs(outs)
            return
        if position is not None and not advance:
            raise InvalidArgument("position is for requests that advance the session")
        await self.durable.fresh(session_id)
        sess = self.store.get(session_id)
        self._check_session_model(sess, model)
        if batch != 1:
            raise InvalidArgument(
                f"inference from session {sid_tag(session_id)} takes batch size 1, got {batch}"
            )
        if not self._entry(model).info.streamable:
            raise FailedPrecondition(
                f"model {model!r} is not streamable (bidirectional): it has no running state "
                "to continue from; use step (exact revised outputs) or infer without a session"
            )
        if advance:
            self._not_held(session_id, "Infer(advance=true)")
        async with sess.lock:
            sess = self.store.get(session_id)
            if advance:
                self._not_held(session_id, "Infer(advance=true)")
            epoch = sess.epoch
            replay = self.durable.check_position(sess, position) if advance else None
            if replay is not None:
                out = Outputs()
                out.replay = replay
                yield out
                return
            outs, nxt = await self.compute.run(graph, feeds, sess.state, 1, length, True)
            if advance:
                self._check_epoch(sess, epoch)
            out, steps0, written = Outputs(outs), sess.steps, []
            if advance:

                async def persist(encode: Callable[[], bytes] | None) -> None:
                    self._not_held(session_id, "Infer(advance=true)")
                    keep = position is not None or sess.durable
                    resp = encode() if encode is not None and keep else None
                    await self._persist(sess, epoch, None, nxt, steps0 + length, None, resp, steps0)
                    written.append(resp)

                out.persist = persist
            yield out
            if not advance or sess.epoch != epoch:
                return
            if not written:
                if self.store.leases.holder_alive(sess.id) is not None:
                    return
                if sess.durable and self.durable.store is not None:
                    await out.persist(None)
            sess.state, sess.steps = nxt, steps0 + length
            resp = written[0] if written else None
            keep = position is not None or sess.durable
            sess.last = (steps0, resp) if keep and resp is not None else None

    @staticmethod
    def _check_session_model(sess: Session, model: str) -> None:
        if sess.model != model:
            raise InvalidArgument(
                f"session {sid_tag(sess.id)} belongs to model {sess.model!r}, not {clip(model)!r}"
            )

    # ---- text and generation ---------------------------------------------------------------
    def _text_vocabs(self, model: str) -> tuple[list[str] | None, list[str] | None]:
        entry = self._entry(model)
        if entry.is_seq2seq:
            enc, dec = entry.graphs["encoder"].contract, entry.graphs["decoder"].contract
            return enc.vocab, dec.target_vocab or dec.vocab
        c = entry.graphs["model"].contract
        return c.vocab, c.vocab

    def encode_text(self, model: str, text: str) -> np.ndarray:
        self._check()
        self.check_steps(len(text), "this text")  # before a per-character walk
        return encode(self._text_vocabs(model)[0], text, model)

    def decode_tokens(self, model: str, ids) -> str:
        self._check()
        entry = self._entry(model)
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
        entry = self._entry(model)
        rng = np.random.default_rng(seed)
        if entry.is_seq2seq:
            gen = generate_seq2seq(self, entry, prompt, max_tokens, temperature, top_k, rng)
        elif entry.info.task == "lm" and entry.graphs["model"].contract.vocab:
            gen = generate_lm(self, entry, prompt, max_tokens, temperature, top_k, rng)
        else:
            raise FailedPrecondition(
                f"model {clip(model)!r} (task {entry.info.task!r}) does not generate text; "
                "generate serves lm and seq2seq models"
            )
        async for piece in gen:
            yield piece


__all__ = ["Chunk", "ModelInfo", "Runtime", "RuntimeOptions", "SessionInfo", "StepResult"]
