"""Per-model batcher: pending chunks of different sequences -> one ORT call.

- at most one chunk per key (session) per batch; a key's later chunks wait, in order, and a
  key never has chunks in two running batches;
- chunks are grouped by length: equal-length chunks run together, so nothing is padded and
  no state ever sees a padding step (padding a recurrent net changes its state);
- ``max_batch`` caps a call;
- ``max_delay_ms`` > 0: once the first chunk arrives, wait up to that long for more work, but
  only while some attached stream (``attach``) that is not already in a running batch has no
  chunk queued: a lone stream, or streams that all answered already, never wait. An attached
  stream that has sent nothing for ``ACTIVE_WINDOW_S`` (or 20 delays, if longer) counts as
  idle and is not waited for, so an idle stream does not slow the others. With no
  stream attached (direct ``submit`` callers) it waits the whole delay unless ``max_batch``
  fills, but a lone chunk (nothing else queued a loop turn later) runs at once. 0 batches
  what is already waiting;
- small batches run inline on the event loop (a lone stream's chunk right in ``submit``):
  handing a call of tens of microseconds to a thread and back costs more (two thread wake-ups
  and a GIL hand-over, ~100 µs measured) than the call;
- large batches run in the executor, up to ``PIPELINE_DEPTH`` at once: ORT releases the GIL,
  so while one batch computes, the event loop answers the previous batch's sessions, reads
  their next chunks and starts a second batch with them. Sessions settle into convoys that
  take turns, and compute overlaps transport instead of alternating with it;
- a group whose ORT call fails is retried member by member, so good sequences still get
  their results and only the bad one gets an error. The batcher never writes a session's
  state: callers replace it only after a successful result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar, cast, overload

import numpy as np

from rnnzoo.errors import InvalidArgument, RnnzooError, Unavailable

from . import telemetry
from .model import Chunk, ServedModel
from .slabs import Slabs

Result = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # batch-free outputs, batch-1 states
T = TypeVar("T")

# A batch runs inline on the event loop when its ORT call is predicted to take at most
# INLINE_BUDGET_S: its steps (summed over its chunks) times the seconds per step the batcher
# has measured on this model at a similar batch size (a step costs several times more at
# batch 1 than at 64); before such a measurement, when it has at most INLINE_MAX_STEPS steps.
# Bigger batches go to the executor so the loop keeps serving other calls (health checks,
# other models) meanwhile. A time budget, not a step count: a large model cannot stall the
# loop for seconds. Inline is the faster path on 2 shared cores: 64 sessions x 32 steps ran at
# 88-98k steps/s inline vs 67-85k via two pipelined executor threads, and 64 x 64 at
# 123-140k vs 98-112k. Inline, ORT runs near its hot-loop rate; in a thread it competes with
# the loop and the client for the same cores and caches.
# An attached stream that sent nothing for this long no longer holds delayed batches back:
# a closed-loop client sends again within a round trip (~0.1-1 ms here), an idle one never.
ACTIVE_WINDOW_S = 0.2
INLINE_BUDGET_S = 0.05  # a loop stall no client notices next to a p99 of tens of ms
INLINE_MAX_STEPS = 512
# Executor batches running at once. Two: one computes while the loop turns the other's
# sessions around. Only batches over the inline budget go there (long chunks, big models),
# where a thread hand-over is small next to the call and a stalled loop would be worse.
PIPELINE_DEPTH = 2


@dataclass(slots=True)
class _Job:
    key: object
    chunk: Chunk
    state: dict[str, np.ndarray]
    future: asyncio.Future[Any] | None  # None: run directly in ``submit``
    queued: float = 0.0  # perf_counter when it was queued (0: never queued)
    timing: telemetry.Timing | None = None  # the submitting request's (telemetry.TIMING)
    then: Callable[[Result], object] | None = None  # makes the future's result from the result


class Batcher:
    def __init__(
        self, model: ServedModel, executor: Executor, max_batch: int = 64, max_delay_ms: float = 0.0
    ) -> None:
        assert max_batch >= 1 and max_delay_ms >= 0
        self.model = model
        self.executor = executor
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        # One FIFO per key that has work, in arrival order of each key's oldest job: taking a
        # batch pops the first job of the first ``max_batch`` keys, never walking the rest.
        self._queues: dict[object, deque[_Job]] = {}
        self._attached: set[object] = set()  # keys of streams that will send more work
        # Attached keys by last activity (oldest first): the ones a delayed batch waits for.
        self._active: OrderedDict[object, float] = OrderedDict()
        self._active_window_s = max(ACTIVE_WINDOW_S, 20 * self.max_delay_s)
        # The batcher task sleeps on ``_waiter`` until ``_want`` keys have work queued, a
        # running batch ends, or a timer fires: ``submit`` wakes it only when that holds,
        # not once per chunk.
        self._waiter: asyncio.Future[None] | None = None
        self._want: float = 1
        self._task: asyncio.Task[None] | None = None
        self._running: set[object] = set()  # keys with a job in a batch now running
        self._offloaded: dict[asyncio.Task[None], list[_Job]] = {}  # executor batches in flight
        # batch-size bucket (bit length of the batch size) -> ORT seconds per chunk step,
        # a running average
        self._s_per_step: dict[int, float] = {}
        self.slabs = Slabs()  # recent batches' whole next states (slabs.py)
        self.calls = 0  # successful ORT calls made (for tests and stats)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # the most recent calls' sizes

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def attach(self, key: object) -> None:
        """``key`` has a stream open: a delayed batch may wait for its next chunk."""
        self._attached.add(key)
        self._touch(key)

    def detach(self, key: object) -> None:
        self._attached.discard(key)
        self._active.pop(key, None)
        self._wake(force=True)  # one stream fewer to wait for: re-check now

    def _touch(self, key: object) -> None:
        self._active[key] = time.monotonic()
        self._active.move_to_end(key)

    def _n_active(self) -> int:
        """Attached streams that sent within the active window (idle ones are dropped)."""
        horizon = time.monotonic() - self._active_window_s
        while self._active:
            key, seen = next(iter(self._active.items()))
            if seen >= horizon:
                break
            del self._active[key]
        return len(self._active)

    async def submit(self, key: object, chunk: Chunk, state: dict[str, np.ndarray]) -> Result:
        if self._task is None or self._task.done():
            raise Unavailable("the server is not running; retry against a running server")
        if key in self._attached:
            self._touch(key)
        if (
            not self._queues
            and not self._running
            and key in self._attached
            and self._n_active() == 1
            and self._inline(chunk.length, 1)
        ):
            # The only attached stream and nothing queued or running: no other work could
            # join this batch, so run it now and skip the hand-over to the batcher task.
            res = self._run_jobs([_Job(key, chunk, state, None, 0.0, telemetry.TIMING.get())])[0]
            if isinstance(res, Exception):
                raise res
            return res
        return await self.enqueue(key, chunk, state)

    @overload
    def enqueue(
        self, key: object, chunk: Chunk, state: dict[str, np.ndarray]
    ) -> asyncio.Future[Result]: ...

    @overload
    def enqueue(
        self, key: object, chunk: Chunk, state: dict[str, np.ndarray], then: Callable[[Result], T]
    ) -> asyncio.Future[T]: ...

    def enqueue(
        self,
        key: object,
        chunk: Chunk,
        state: dict[str, np.ndarray],
        then: Callable[[Result], Any] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue one chunk without waiting: its future. A caller with many chunks (StepMany)
        queues them all, then awaits the futures in order: only the first wait suspends, the
        rest are done by then (no task and no wake-up per chunk). ``then``: the future's
        result is ``then(result)`` (made as the batch is delivered: no coroutine per chunk
        to await the result and make it); without it, the result itself."""
        if self._task is None or self._task.done():
            raise Unavailable("the server is not running; retry against a running server")
        if key in self._attached:
            self._touch(key)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        q = self._queues.get(key)
        if q is None:
            self._queues[key] = q = deque()
        q.append(_Job(key, chunk, state, fut, time.perf_counter(), telemetry.TIMING.get(), then))
        self._wake()
        return fut

    @property
    def idle(self) -> bool:
        return not self._queues and not self._running

    async def stop(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        gone = Unavailable("the server stopped before this step ran")
        for task, jobs in list(self._offloaded.items()):
            task.cancel()  # the ORT call itself cannot be interrupted; its result is dropped
            for job in jobs:
                assert job.future is not None  # only a job run in submit has none
                if not job.future.done():
                    job.future.set_exception(gone)
        for q in self._queues.values():
            for job in q:
                assert job.future is not None  # only a job run in submit has none
                if not job.future.done():
                    job.future.set_exception(gone)
        self._queues.clear()

    def _inline(self, steps: int, rows: int) -> bool:
        """Run a batch of ``rows`` chunks, ``steps`` steps in all, on the event loop (see
        INLINE_BUDGET_S)?"""
        per_step = self._s_per_step.get(rows.bit_length())
        if per_step is None:
            return steps <= INLINE_MAX_STEPS
        return steps * per_step <= INLINE_BUDGET_S

    # ---- the batcher task --------------------------------------------------------------------
    def _wake(self, force: bool = False) -> None:
        w = self._waiter
        if w is not None and not w.done() and (force or len(self._queues) >= self._want):
            w.set_result(None)

    async def _sleep(self, want: float, deadline: float | None = None) -> None:
        """Until ``want`` keys have work queued, a forced wake-up, or ``deadline`` (loop time).
        ``want=inf``: only a forced wake-up (a batch ended, a stream detached) or the timer."""
        loop = asyncio.get_running_loop()
        self._want = want
        self._waiter = w = loop.create_future()
        timer = None if deadline is None else loop.call_at(deadline, _resolve, w)
        try:
            await w
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _batch_want(self) -> int:
        """Queued keys worth waiting for: attached streams not already in a running batch."""
        if not self._attached:
            return self.max_batch
        return max(1, min(self.max_batch, self._n_active() - len(self._running)))

    async def _gather(self) -> None:
        """Wait up to max_delay for more work while an attached stream has none queued.
        Without streams (unary callers): a lone chunk goes at once; the window is waited only
        when others queued beside it (concurrent unary calls batch, a lone one never waits:
        that wait was the whole gap between a unary sequence step, p50 3.1 ms, and the same
        step with --max-delay-ms 0, 1.27 ms)."""
        if not self._attached:
            await asyncio.sleep(0)  # let coroutines that are ready enqueue too
            if len(self._queues) <= 1:
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while len(self._queues) < (want := self._batch_want()) and loop.time() < deadline:
            await self._sleep(want, deadline)

    def _take(self) -> list[_Job]:
        """Up to max_batch jobs, the first of each key not running; the rest stay queued."""
        taken: list[_Job] = []
        # At most len(_running) keys are skipped, so this many keys always suffice: taking a
        # batch never walks the whole queue, however many sessions have work waiting.
        for key in list(itertools.islice(self._queues, self.max_batch + len(self._running))):
            if len(taken) == self.max_batch:
                break
            if key in self._running:  # its previous chunk is still computing
                continue
            q = self._queues[key]
            while q and cast("asyncio.Future[Result]", q[0].future).done():  # the caller went away
                q.popleft()
            if q:
                taken.append(q.popleft())
            if q:  # move to the back: keys that just ran queue behind the others
                del self._queues[key]
                self._queues[key] = q
            else:
                del self._queues[key]
        return taken

    async def _loop(self) -> None:
        while True:
            while not self._queues:
                await self._sleep(1)
            while len(self._offloaded) >= PIPELINE_DEPTH:
                await self._sleep(float("inf"))
            if self.max_delay_s > 0:
                await self._gather()
            else:
                await asyncio.sleep(0)  # let coroutines that are ready enqueue too
            jobs = self._take()
            if not jobs:
                if self._queues:  # every queued key is in a running batch: wait for one
                    await self._sleep(float("inf"))
                continue
            if self._inline(sum(j.chunk.length for j in jobs), len(jobs)):
                self._deliver(jobs, self._run_jobs(jobs))
            else:
                self._running.update(j.key for j in jobs)
                task = asyncio.get_running_loop().create_task(self._offload(jobs))
                self._offloaded[task] = jobs

    async def _offload(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self._run_jobs, jobs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the executor itself failed: fail these jobs only
            results = [exc] * len(jobs)
        finally:
            self._running.difference_update(j.key for j in jobs)
            self._offloaded.pop(cast("asyncio.Task[None]", asyncio.current_task()), None)
            self._wake(force=True)
        self._deliver(jobs, results)

    @staticmethod
    def _deliver(jobs: list[_Job], results: Sequence[Result | BaseException]) -> None:
        for job, res in zip(jobs, results, strict=True):
            assert job.future is not None  # only a job run in submit has none
            if job.future.done():
                continue
            if isinstance(res, BaseException):
                job.future.set_exception(res)
            else:
                job.future.set_result(res if job.then is None else job.then(res))

    # ---- runs inline or in the executor thread -------------------------------------------
    def _run_jobs(self, jobs: list[_Job]) -> list[Result | Exception]:
        results: list[Result | Exception | None] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.chunk.length, []).append(i)
        for idx in groups.values():
            try:
                for i, r in zip(idx, self._run_group([jobs[i] for i in idx]), strict=True):
                    results[i] = r
            except Exception as exc:
                if len(idx) == 1:
                    results[idx[0]] = self._wrap(exc)
                    continue
                for i in idx:  # isolate the failing member(s)
                    try:
                        results[i] = self._run_group([jobs[i]])[0]
                    except Exception as one:
                        results[i] = self._wrap(one)
        return results  # type: ignore[return-value]

    def _run_group(self, jobs: list[_Job]) -> list[Result]:
        m = self.model
        if len(jobs) == 1:
            return [self._run_one(jobs[0])]
        feeds = m.stack_chunks([j.chunk for j in jobs])
        rows = [j.state for j in jobs]
        states = self.slabs.whole(rows)  # the same sessions as a kept batch: fed whole
        if states is None:
            states = m.stack_states(rows)
        t0 = time.perf_counter()
        telemetry.batch(m.contract.name, len(jobs), [t0 - j.queued for j in jobs if j.queued])
        outs, nxt = m.run(feeds, states)
        self._ran(len(jobs), jobs[0].chunk.length, t0)  # a group shares one length (_run_jobs)
        _timed(jobs, t0)
        nxt_rows = m.split_states(nxt, len(jobs))
        self.slabs.keep(nxt_rows, {key: nxt[key] for key, _ in m.slots})
        return list(zip(m.split_outputs(outs, len(jobs)), nxt_rows, strict=True))

    def _run_one(self, job: _Job) -> Result:
        """The lean path: a lone chunk. Its batch-1 state is fed as it is (ORT never writes
        its inputs) and the next state comes back batch-1: nothing to gather or scatter but
        the outputs' batch axis."""
        m = self.model
        feeds = m.stack_chunks([job.chunk])  # a view with a batch axis, no copy
        t0 = time.perf_counter()
        telemetry.batch(m.contract.name, 1, [t0 - job.queued] if job.queued else [])
        outs, nxt = m.run(feeds, job.state)
        self._ran(1, job.chunk.length, t0)
        _timed((job,), t0)
        return m.split_outputs(outs, 1)[0], nxt

    def _ran(self, rows: int, length: int, t0: float) -> None:
        """Record a successful ORT call of ``rows`` chunks of ``length`` steps begun at
        ``t0``: its seconds per chunk step (a running average per batch-size bucket, what
        ``_inline`` predicts from), the call count and the batch size."""
        per_step = (time.perf_counter() - t0) / (rows * length)
        bucket = rows.bit_length()
        old = self._s_per_step.get(bucket)  # one dict store: safe from the executor thread
        self._s_per_step[bucket] = per_step if old is None else 0.8 * old + 0.2 * per_step
        self.calls += 1
        self.batch_sizes.append(rows)

    def _wrap(self, exc: Exception) -> Exception:
        if isinstance(exc, RnnzooError):
            return exc
        return InvalidArgument(
            f"model {self.model.contract.name!r} failed on this input "
            f"({type(exc).__name__}: {str(exc).strip()[:300]}); the session state is unchanged"
        )


def _timed(jobs: Sequence[_Job], t0: float) -> None:
    """Add the wait and the ORT call begun at ``t0`` to each job's request timing."""
    t1 = time.perf_counter()
    for job in jobs:
        if job.timing is not None:
            if job.queued:
                job.timing.queue_ns += int((t0 - job.queued) * 1e9)
            job.timing.infer_ns += int((t1 - t0) * 1e9)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # a timer firing after a wake-up finds it resolved already
        fut.set_result(None)
