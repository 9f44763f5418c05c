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
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rnnzoo.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RnnzooError,
    Unavailable,
)

from .batching import Batcher
from .caller import job_key
from .durable import Durability, batch_free, check_position
from .generate import check_sampling, decode, encode, never_sampled, sample_token
from .jobs import LongJobs
from .lease import Lease
from .memory import LARGE_BYTES, LARGE_STEPS, Trimmer
from .model import Chunk, ServedModel
from .redact import clip, sid_tag
from .repository import ModelInfo, ModelRepository, ServedEntry
from .sessions import Session, SessionInfo, SessionStore
from .snapshot import Snapshot
from .store import StateStore, open_store


@dataclass
class RuntimeOptions:
    intra_op_threads: int = 1  # ORT: sequential, no spinning (see model.py)
    inter_op_threads: int = 1
    max_batch: int = 64
    max_delay_ms: float = 1.0  # wait for attached streams up to this long; 0 = no wait
    max_sessions: int = 10_000
    on_full: str = "reject"  # or "evict" (least recently used)
    session_ttl_s: float | None = 600.0  # None or 0 disables idle expiry
    max_buffer_steps: int = 10_000  # non-streamable (bidirectional) sessions
    sweep_interval_s: float = 5.0  # how often the sweeper looks for idle sessions
    # Cost limits, checked before compute (docs/limits.md). Over one: ResourceExhausted
    # saying the limit and how to stay under it.
    max_request_steps: int = 100_000  # per Stream chunk, per Infer (batch x time), per prompt
    max_output_bytes: int = 15 << 20  # predicted from the contract; the server caps it to
    # its message size
    max_generate_tokens: int = 4_096
    lease_ttl_s: float = 30.0  # a stream's hold on its session, renewed while it lives
    # Quota: live sessions per client (principal with authentication, else connection);
    # 0 = none.
    max_sessions_per_client: int = 5_000
    # Long jobs (jobs.py): a request of this many steps (batch x time; a bidirectional
    # session's whole prefix) or more runs in the long-job pool, never on the event loop.
    long_job_steps: int = 2_048
    long_workers: int = 0  # threads of the long-job pool; 0 = cpu_count - 1 (at least 1)
    max_long_jobs: int = 64  # admitted at once (running or waiting); beyond: ResourceExhausted
    max_long_jobs_per_client: int = 8
    long_slice_s: float = 0.02  # a streamable long job runs in slices of about this long
    long_nice: int = 10  # the long-job threads' nice value (lower OS priority); 0 = unchanged
    malloc_trim: bool = True  # give freed memory back to the OS after large requests
    # Durable sessions (store.py): a directory (embedded SQLite) or a redis:// URL; None =
    # sessions live in this process only.
    state_store: str | None = None

    def check(self) -> None:
        problems = []
        if self.intra_op_threads < 1 or self.inter_op_threads < 1:
            problems.append("intra_op_threads and inter_op_threads must be >= 1")
        if self.max_batch < 1:
            problems.append(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_delay_ms < 0:
            problems.append(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.max_sessions < 1:
            problems.append(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.on_full not in ("reject", "evict"):
            problems.append(f"on_full must be 'reject' or 'evict', got {self.on_full!r}")
        if self.session_ttl_s is not None and self.session_ttl_s < 0:
            problems.append(f"session_ttl_s must be >= 0 (or None), got {self.session_ttl_s}")
        for name in ("max_buffer_steps", "max_request_steps", "max_output_bytes",
                     "max_generate_tokens", "long_job_steps", "max_long_jobs",
                     "max_long_jobs_per_client"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.long_nice <= 19:
            problems.append(f"long_nice must be in [0, 19], got {self.long_nice}")
        if self.max_sessions_per_client < 0 or self.long_workers < 0:
            problems.append("max_sessions_per_client and long_workers must be >= 0")
        if not self.long_slice_s > 0:
            problems.append(f"long_slice_s must be > 0, got {self.long_slice_s}")
        if not self.lease_ttl_s > 0:
            problems.append(f"lease_ttl_s must be > 0, got {self.lease_ttl_s}")
        if problems:
            raise InvalidArgument("bad runtime options: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class StepResult:
    outputs: dict[str, np.ndarray]  # batch-free, (T, ...)
    start: int  # index in the session's sequence of the first returned step
    steps_total: int
    revised: bool  # True: outputs re-cover the whole prefix (non-streamable models)
    # Deduplication: the stored response of the chunk at this position (then nothing was
    # computed and the other fields are empty).
    replay: bytes | None = None
    # ``await persist(response_bytes)`` before sending the response: writes the new state
    # and the response through the state store (and keeps the response for deduplication).
    persist: Callable | None = field(default=None, compare=False)


class Outputs(dict):
    """Infer's outputs; ``replay``/``persist`` as in StepResult."""

    replay: bytes | None = None
    persist: Callable | None = None


class Runtime:
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
        o = self.options
        self.jobs = LongJobs(
            o.long_workers, o.max_long_jobs, o.max_long_jobs_per_client, o.long_nice
        )
        self._row_step_s: dict[int, float] = {}  # id(graph) -> seconds per (row x step)
        self.trimmer = Trimmer(self.options.malloc_trim)
        self._executor = ThreadPoolExecutor(max(1, os.cpu_count() or 1), "rnnzoo-ort")
        self.batchers: dict[tuple[str, str], Batcher] = {}
        for name, entry in repo.entries.items():
            for role, graph in entry.graphs.items():
                self.batchers[(name, role)] = Batcher(
                    graph, self._executor, self.options.max_batch, self.options.max_delay_ms
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
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.jobs.shutdown()
        self.trimmer.cancel()
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

    # ---- sessions --------------------------------------------------------------------------
    def create_session(
        self,
        model: str,
        initial_state: dict[str, np.ndarray] | None = None,
        ttl_s: float | None = None,
    ) -> SessionInfo:
        """A new session. ``ttl_s``: its own idle expiry, at most the server's (None: the
        server's)."""
        self._check()
        _, graph = self._single(model, "a session")
        init = graph.validate_state(initial_state or {})
        sess = self.store.create(model, init, ttl_s)
        return self.store.info(sess)

    async def acreate_session(
        self,
        model: str,
        initial_state: dict[str, np.ndarray] | None = None,
        ttl_s: float | None = None,
        snapshot: Snapshot | None = None,
    ) -> SessionInfo:
        """``create_session``, written through the state store; with ``snapshot``, a restore
        (FailedPrecondition if it was taken from another version of the model)."""
        self._check()
        if snapshot is None:
            info = self.create_session(model, initial_state, ttl_s)
            sess = self.store.get(info.id, touch=False)
        else:
            if model and model != snapshot.model:
                raise InvalidArgument(
                    f"the snapshot is of model {snapshot.model!r}, not {clip(model)!r}"
                )
            if initial_state:
                raise InvalidArgument("give a snapshot or an initial_state, not both")
            self.durable.check_snapshot(snapshot)
            sess = self.store.create(snapshot.model, dict(snapshot.initial), ttl_s)
            self.durable.fill(sess, snapshot)
        try:
            await self.durable.create(sess)
        except BaseException:
            self.store.close(sess.id)
            raise
        return self.store.info(sess)

    def restore_snapshot(self, snap: Snapshot) -> Snapshot:
        """A client's snapshot (batch-free states, raw chunks) -> checked, session-ready."""
        self.durable.check_snapshot(snap)
        _, graph = self._single(snap.model, "a session")
        if snap.steps < 0:
            raise InvalidArgument(f"snapshot steps must be >= 0, got {snap.steps}")
        snap.state = graph.validate_state(snap.state)
        snap.initial = graph.validate_state(snap.initial)
        snap.buffer = [graph.validate_chunk(c) for c in snap.buffer]
        if snap.buffer and sum(c.length for c in snap.buffer) != snap.steps:
            raise InvalidArgument("the snapshot's buffered chunks do not add up to its steps")
        return snap

    async def snapshot_session(self, session_id: str) -> tuple[Snapshot, dict, dict, list]:
        """(snapshot, batch-free state, batch-free initial state, buffered chunks' arrays)."""
        self._check()
        await self.durable.fresh(session_id)
        sess = self.store.get(session_id)
        snap = self.durable.snapshot(sess)
        graph = self._entry(sess.model).graphs["model"]
        return (snap, batch_free(graph, snap.state), batch_free(graph, snap.initial),
                [c.arrays for c in snap.buffer])  # fmt: skip

    async def fork_session(self, session_id: str, ttl_s: float | None = None) -> SessionInfo:
        """A new session with a copy of ``session_id``'s state (counts against capacity and
        quotas like any new session)."""
        self._check()
        await self.durable.fresh(session_id)
        src = self.store.get(session_id)
        snap = self.durable.snapshot(src)
        if ttl_s is None:
            ttl_s = src.ttl_s
        return await self.acreate_session(src.model, None, ttl_s, snapshot=snap)

    async def aattach(
        self, session_id: str, holder: str | None = None, alive: Callable[[], bool] | None = None
    ) -> Lease:
        """``attach``, taking the lease in the state store (any process) when the session is
        there; the session is read from the store as it stands."""
        self._check()
        if self.durable.store is None:
            return self.attach(session_id, holder, alive)
        holder = holder or secrets.token_hex(8)
        if session_id not in self.store._live:
            await self.durable.fresh(session_id)
        self.store.get(session_id, touch=False)  # NotFound / ownership before the store
        lease, rec = await self.store.leases.take(session_id, holder)
        if rec is not None:
            from .snapshot import from_bytes

            self.durable.adopt(session_id, from_bytes(rec.snap), rec.epoch, rec.resp, rec.rpos)
        self.store.get(session_id)
        return self._attached(session_id, lease, alive)

    async def aclose_session(self, session_id: str, lease: Lease | None = None) -> None:
        await self.durable.fresh(session_id)
        self.close_session(session_id, lease)
        if self.durable.store is not None:
            await self.durable.store.delete(session_id)

    async def areset_session(self, session_id: str, lease: Lease | None = None) -> None:
        await self.durable.fresh(session_id)
        sess = self.store.get(session_id, touch=False)
        self._not_held(session_id, "ResetSession", lease)
        snap = self.durable.snapshot(sess)
        snap.state, snap.steps, snap.buffer = dict(sess.initial), 0, []
        await self.durable.write(sess, snap, lease, None, -1)
        self.reset_session(session_id, lease)

    def _not_held(self, session_id: str, what: str, lease: Lease | None = None) -> None:
        """FailedPrecondition if a live stream other than ``lease``'s holds the session."""
        held = self.store.leases.holder_alive(session_id)
        if held is not None and held is not lease:
            raise FailedPrecondition(
                f"session {sid_tag(session_id)} is attached to an open stream, which owns it "
                f"while it is open: {what} is refused. End that stream first (or send the "
                "chunks over it); a stream that died frees the session when its lease runs "
                f"out, at most {self.store.leases.ttl_s:g} s after its last renewal "
                f"({held.expires_at - self.store.clock():.1f} s from now)"
            )

    def close_session(self, session_id: str, lease: Lease | None = None) -> None:
        """Close; FailedPrecondition while a stream other than ``lease``'s holder is attached."""
        self._check()
        self.store.get(session_id, touch=False)
        self._not_held(session_id, "CloseSession", lease)
        self.store.close(session_id)

    def reset_session(self, session_id: str, lease: Lease | None = None) -> None:
        """Back to the initial state; FailedPrecondition while another stream is attached."""
        self._check()
        sess = self.store.get(session_id, touch=False)
        self._not_held(session_id, "ResetSession", lease)
        sess = self.store.get(session_id)
        sess.state = dict(sess.initial)
        sess.steps = 0
        sess.buffer = []
        sess.last = None
        sess.epoch += 1

    def attach(
        self, session_id: str, holder: str | None = None, alive: Callable[[], bool] | None = None
    ) -> Lease:
        """Take the session's lease for ``holder`` (a stream). ``alive()`` says whether that
        stream still lives: the runtime renews the lease while it does (None: always)."""
        self._check()
        lease = self.store.attach(session_id, holder or secrets.token_hex(8))
        return self._attached(session_id, lease, alive)

    def _attached(self, session_id: str, lease: Lease, alive) -> Lease:
        batcher = self.batchers.get((self.store.get(session_id, touch=False).model, "model"))
        old = self._streams.get(session_id)
        if old is not None and old[1] is not None:  # a take-over from a dead stream
            old[1].detach(session_id)
        if batcher is not None:
            batcher.attach(session_id)
        self._streams[session_id] = (lease, batcher, alive)
        return lease

    def detach(self, session_id: str, lease: Lease) -> None:
        self.store.detach(session_id, lease)  # allowed while stopping: streams close then
        entry = self._streams.get(session_id)
        if entry is not None and entry[0] is lease:
            del self._streams[session_id]
            if entry[1] is not None:
                entry[1].detach(session_id)

    def session_info(self, session_id: str) -> SessionInfo:
        self._check()
        return self.store.info(self.store.get(session_id))

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

    @contextlib.asynccontextmanager
    async def stepping(
        self,
        session_id: str,
        inputs: dict[str, np.ndarray],
        lease: Lease | None = None,
        position: int | None = None,
    ) -> AsyncIterator[StepResult]:
        """Compute one chunk and yield its result inside the session's lock; the new state
        is committed when the ``async with`` block ends without an error (the caller sent
        the response), and not at all otherwise. ``lease``: the calling stream's lease; a
        session leased by another live stream is FailedPrecondition. ``position``: the
        steps the request expects before its chunk (deduplication, see durable.py); a
        replayed chunk yields ``StepResult.replay``. A caller that sends the response calls
        ``await result.persist(response_bytes)`` first: the state is then written through
        the store, and committed here even if the send fails (a retry gets the replay)."""
        self._check()
        if lease is None:
            await self.durable.fresh(session_id)
        sess = self.store.get(session_id)
        entry, graph = self._single(sess.model, "step")
        self._check_lease(session_id, lease)
        chunk = graph.validate_chunk(inputs)  # before anything is queued or locked
        self.check_steps(chunk.length, "this chunk")
        async with sess.lock:
            sess = self.store.get(session_id)  # closed/expired while waiting?
            self._check_lease(session_id, lease)
            epoch = sess.epoch
            replay = check_position(sess, position)
            if replay is not None:
                yield StepResult({}, 0, sess.steps, False, replay=replay)
                return
            batcher = self.batchers[(sess.model, "model")]
            steps0, keep = sess.steps, position is not None or sess.durable
            if entry.info.streamable:
                self._check_output(graph, 1, chunk.length, "this chunk")
                if chunk.length >= self.options.long_job_steps:
                    outs, nxt = await self._long_chunk(graph, chunk, sess.state, True)
                else:
                    outs, nxt = await batcher.submit(session_id, chunk, sess.state)
                self._check_epoch(sess, epoch)
                total, buffer = steps0 + chunk.length, None
            else:
                total = steps0 + chunk.length
                if total > self.options.max_buffer_steps:
                    raise ResourceExhausted(
                        f"session {sid_tag(session_id)} of non-streamable model {sess.model!r} "
                        f"would hold {total} steps, over the server's max_buffer_steps="
                        f"{self.options.max_buffer_steps}; reset the session or start a new one"
                    )
                self._check_output(graph, 1, total, "this chunk's revised prefix")
                prefix = graph.concat_chunks([*sess.buffer, chunk])
                if total >= self.options.long_job_steps:  # a bidirectional net: one slice
                    outs, nxt = await self._long_chunk(graph, prefix, sess.initial, False)
                else:
                    outs, nxt = await batcher.submit(session_id, prefix, sess.initial)
                self._check_epoch(sess, epoch)
                buffer = [*sess.buffer, chunk]
            written: list[bytes | None] = []

            async def persist(resp: bytes | None) -> None:
                await self._persist(sess, epoch, lease, nxt, total, buffer, resp, steps0)
                written.append(resp)

            start = steps0 if buffer is None else 0
            yield StepResult(outs, start, total, buffer is not None, persist=persist)
            if not written:
                if not self._may_commit(sess, epoch, lease):
                    return
                if sess.durable and self.durable.store is not None:  # a caller without persist
                    await persist(None)
            sess.state, sess.steps = nxt, total
            if buffer is not None:
                sess.buffer = buffer
            resp = written[0] if written else None
            sess.last = (steps0, resp) if keep and resp is not None else None

    async def _persist(self, sess: Session, epoch: int, lease: Lease | None, state: dict,
                       steps: int, buffer: list | None, resp: bytes | None, rpos: int) -> None:  # fmt: skip
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
        ``await outputs.persist(response_bytes)`` before sending (write-through)."""
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
            outs, _ = await self._compute(graph, feeds, states, batch, length, streamable)
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
            replay = check_position(sess, position) if advance else None
            if replay is not None:
                out = Outputs()
                out.replay = replay
                yield out
                return
            outs, nxt = await self._compute(graph, feeds, sess.state, 1, length, True)
            if advance:
                self._check_epoch(sess, epoch)
            out, steps0, written = Outputs(outs), sess.steps, []
            if advance:

                async def persist(resp: bytes | None) -> None:
                    self._not_held(session_id, "Infer(advance=true)")
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

    # ---- long jobs ------------------------------------------------------------------------------
    async def _compute(self, graph, feeds, states, batch: int, length: int, sliceable: bool):
        """A batched call: in the long-job pool when long, else in the shared executor."""
        if batch * length >= self.options.long_job_steps:
            return await self._long_run(graph, feeds, states, batch, length, sliceable)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, graph, feeds, states)

    async def _long_chunk(self, graph: ServedModel, chunk: Chunk, state: dict, sliceable: bool):
        """One session's chunk as a long job: (batch-free outputs, batch-1 next state)."""
        feeds = graph.stack_chunks([chunk])
        outs, nxt = await self._long_run(graph, feeds, state, 1, chunk.length, sliceable)
        return graph.split_outputs(outs, 1)[0], nxt

    def _slice_steps(self, graph: ServedModel, batch: int) -> int:
        per = self._row_step_s.get(id(graph))
        if per is None:
            n = max(64, 2048 // batch)
        else:
            n = max(64, int(self.options.long_slice_s / (per * batch)))
        unit = graph.chunk.unit if graph.chunk is not None else 1  # whole chunks per slice
        return max(unit, n // unit * unit)

    async def _long_run(self, graph, feeds, states, batch: int, length: int, sliceable: bool):
        """Run in the long-job pool; a streamable graph in time slices, state carried."""
        key = job_key()
        what = f"this request ({batch} x {length} steps)"
        large = graph.output_bytes(batch, length) >= LARGE_BYTES or batch * length >= LARGE_STEPS
        with self.jobs.admit(key, what), self._trim_after(large):
            if not sliceable:
                return await self.jobs.run_slice(key, self._run, graph, feeds, states)
            parts, t = [], 0
            while t < length:
                self._check()
                n = min(length - t, self._slice_steps(graph, batch))
                part = _time_slice(graph.contract.inputs, feeds, t, t + n)
                outs, states = await self.jobs.run_slice(
                    key, self._timed_run, graph, part, states, batch * n
                )
                parts.append(outs)
                t += n
            if len(parts) == 1:
                return parts[0], states
            outs = await self.jobs.run_slice(key, _concat_time, graph.contract.outputs, parts)
            return outs, states

    @contextlib.contextmanager
    def _trim_after(self, large: bool):
        """Schedule a malloc_trim once large work ends, however it ends (memory.py)."""
        try:
            yield
        finally:
            if large:
                self.trimmer.soon()

    def _timed_run(self, graph: ServedModel, feeds: dict, states: dict, row_steps: int):
        t0 = time.perf_counter()
        res = self._run(graph, feeds, states)
        per = (time.perf_counter() - t0) / row_steps
        old = self._row_step_s.get(id(graph))
        self._row_step_s[id(graph)] = per if old is None else 0.7 * old + 0.3 * per
        return res

    @staticmethod
    def _run(graph: ServedModel, feeds: dict, states: dict):
        try:
            return graph.run(feeds, states)
        except RnnzooError:  # ORT's failures come described whole (ServedModel.run)
            raise
        except Exception as exc:
            raise InvalidArgument(
                f"model {graph.contract.name!r} failed on this input "
                f"({type(exc).__name__}: {str(exc).strip()[:300]})"
            ) from None

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
            gen = self._generate_seq2seq(entry, prompt, max_tokens, temperature, top_k, rng)
        elif entry.info.task == "lm" and entry.graphs["model"].contract.vocab:
            gen = self._generate_lm(entry, prompt, max_tokens, temperature, top_k, rng)
        else:
            raise FailedPrecondition(
                f"model {clip(model)!r} (task {entry.info.task!r}) does not generate text; "
                "generate serves lm and seq2seq models"
            )
        async for piece in gen:
            yield piece

    async def _feed(self, role: str, entry: ServedEntry, key, ids: np.ndarray, state: dict):
        """Run token ids (T,) through one graph from ``state``: (last-step outputs, state)."""
        graph = entry.graphs[role]
        chunk = graph.validate_chunk({graph.contract.inputs[0].name: ids})
        if chunk.length >= self.options.long_job_steps:  # a long prompt: not on the loop
            return await self._long_chunk(graph, chunk, state, entry.info.streamable)
        outs, nxt = await self.batchers[(entry.info.name, role)].submit(key, chunk, state)
        return outs, nxt

    async def _generate_lm(self, entry, prompt, max_tokens, temperature, top_k, rng):
        graph = entry.graphs["model"]
        c = graph.contract
        ids = encode(c.vocab, prompt, c.name)
        if ids.size == 0:
            if "bos" not in c.special_tokens:
                raise InvalidArgument(f"model {c.name!r} needs a non-empty prompt (it has no bos)")
            ids = np.array([c.special_tokens["bos"]], np.int64)
        key, state = object(), graph.init_states
        logits_name = c.outputs[0].name
        banned = never_sampled(c.special_tokens)
        with self._generating(entry, key):
            for _ in range(max_tokens):
                self._check()
                outs, state = await self._feed("model", entry, key, ids, state)
                tok = sample_token(outs[logits_name][-1], temperature, top_k, rng, banned)
                if tok == c.special_tokens.get("eos", -1):
                    return
                yield c.vocab[tok]
                ids = np.array([tok], np.int64)

    @contextlib.contextmanager
    def _generating(self, entry: ServedEntry, key: object):
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

    async def _generate_seq2seq(self, entry, prompt, max_tokens, temperature, top_k, rng):
        enc, dec = entry.graphs["encoder"], entry.graphs["decoder"]
        src = encode(enc.contract.vocab, prompt, entry.info.name)
        if src.size == 0:
            raise InvalidArgument(f"seq2seq model {entry.info.name!r} needs a non-empty prompt")
        key = object()
        with self._generating(entry, key):
            _, enc_state = await self._feed("encoder", entry, key, src, enc.init_states)
            # encoder state outputs map by position onto decoder state inputs
            state = dict(dec.init_states)  # and a decoder's context windows start afresh
            for es, ds in zip(enc.contract.states, dec.contract.states, strict=True):
                state[ds.input] = np.moveaxis(enc_state[es.input], es.batch_axis, ds.batch_axis)
            special = dec.contract.special_tokens
            vocab = dec.contract.target_vocab or dec.contract.vocab
            logits_name = dec.contract.outputs[0].name
            sep = dec.contract.target_separator
            ids = np.array([special["bos"]], np.int64)
            banned = never_sampled(special)
            for n in range(max_tokens):
                self._check()
                outs, state = await self._feed("decoder", entry, key, ids, state)
                tok = sample_token(outs[logits_name][-1], temperature, top_k, rng, banned)
                if tok == special["eos"]:
                    return
                yield (sep if n else "") + vocab[tok]
                ids = np.array([tok], np.int64)


def _time_slice(specs, feeds: dict, a: int, b: int) -> dict:
    """Steps [a, b) of a batched feed (inputs without a time axis whole)."""
    out = {}
    for spec in specs:
        arr = feeds[spec.name]
        if spec.time_axis is None:
            out[spec.name] = arr
        else:
            idx = [slice(None)] * arr.ndim
            idx[spec.time_axis] = slice(a, b)
            out[spec.name] = arr[tuple(idx)]
    return out


def _concat_time(specs, parts: list[dict]) -> dict:
    """Outputs of consecutive time slices -> the whole sequence's outputs."""
    out = {}
    for spec in specs:
        arrs = [p[spec.name] for p in parts]
        out[spec.name] = (
            arrs[-1] if spec.time_axis is None else np.concatenate(arrs, spec.time_axis)
        )
    return out


__all__ = ["Chunk", "ModelInfo", "Runtime", "RuntimeOptions", "SessionInfo", "StepResult"]
