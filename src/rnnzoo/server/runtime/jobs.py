"""Long jobs: work too big for the event loop, run in a small, low-priority, fair worker pool.

What is long (``Runtime`` decides, by ``RuntimeOptions.long_job_steps``): an Infer of many
steps, a long Stream chunk, a bidirectional session's prefix recompute, a long generation
prompt. Such work never runs on the event loop (where it would stall every other client's
1-step chunks) and never in the shared executor (two of them used to fill it):

- ``workers`` threads run slices, at most that many at once; each thread lowers its own OS
  priority (``nice``, per thread on Linux), so on shared cores the event loop, which answers
  the light clients, wins the CPU when both want it;
- a job is cut into slices (``run_slice`` per slice; a streamable sequence is sliced along
  time with its state carried: see ``Compute.long_run``), and the slot goes round-robin
  across callers (``caller.job_key``: the principal, or the connection): after each slice a
  job queues behind the other callers' waiting slices, so one client's two 100,000-step
  Infers take turns with a third client's job instead of running before it;
- admission (``admit``): at most ``max_jobs`` long jobs admitted at once (running or waiting
  for a slot), ``max_per_client`` per caller; beyond, ResourceExhausted names the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from rnnzoo.errors import ResourceExhausted

T = TypeVar("T")


def _lower_priority(nice: int) -> None:
    """Runs in each worker thread: raise this thread's nice value (Linux: per thread)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))


def default_workers() -> int:
    """One core left for the event loop: ``cpu_count - 1``, at least 1."""
    return max(1, (os.cpu_count() or 1) - 1)


class LongJobs:
    def __init__(
        self, workers: int = 0, max_jobs: int = 64, max_per_client: int = 8, nice: int = 10
    ) -> None:
        self.workers = workers or default_workers()
        self.max_jobs = max_jobs
        self.max_per_client = max_per_client
        self.nice = nice
        self.pool = ThreadPoolExecutor(
            self.workers, "rnnzoo-long", initializer=_lower_priority, initargs=(nice,)
        )
        self._busy = 0  # slots taken (a slice running, or handed to a waiter)
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()  # round-robin
        self.jobs = 0  # admitted jobs
        self._per_client: dict[str, int] = {}
        # for tests and stats
        self.peak_busy = 0
        self.peak_jobs = 0
        self.slices = 0
        self.refused = 0

    # ---- admission -----------------------------------------------------------------------
    @contextlib.contextmanager
    def admit(self, key: str, what: str) -> Iterator[None]:
        """Count one long job for ``key`` while the block runs; ResourceExhausted when the
        server or this caller already has its maximum."""
        if self.jobs >= self.max_jobs:
            self.refused += 1
            raise ResourceExhausted(
                f"{what} is a long job and the server already runs or queues its maximum of "
                f"{self.max_jobs} long jobs (max_long_jobs; {self.workers} run at once); "
                "retry in a few seconds, or send shorter requests (they run inline)"
            )
        mine = self._per_client.get(key, 0)
        if mine >= self.max_per_client:
            self.refused += 1
            raise ResourceExhausted(
                f"{what} is a long job and this client already has its maximum of "
                f"{self.max_per_client} long jobs running or queued "
                "(max_long_jobs_per_client); wait for one to finish before sending another"
            )
        self.jobs += 1
        self._per_client[key] = mine + 1
        self.peak_jobs = max(self.peak_jobs, self.jobs)
        try:
            yield
        finally:
            self.jobs -= 1
            n = self._per_client[key] - 1
            if n:
                self._per_client[key] = n
            else:
                del self._per_client[key]

    # ---- fair slots ------------------------------------------------------------------------
    async def _acquire(self, key: str) -> None:
        if self._busy < self.workers and not self._waiting:
            self._busy += 1
            self.peak_busy = max(self.peak_busy, self._busy)
            return
        fut = asyncio.get_running_loop().create_future()
        q = self._waiting.get(key)
        if q is None:
            self._waiting[key] = q = deque()
        q.append(fut)
        try:
            await fut  # the slot is handed over by _release (busy stays counted)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # handed to us just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    q.remove(fut)
                if not q and self._waiting.get(key) is q:
                    del self._waiting[key]
            raise

    def _release(self) -> None:
        while self._waiting:
            key, q = next(iter(self._waiting.items()))
            fut = q.popleft()
            if q:
                self._waiting.move_to_end(key)  # this caller's next slice waits its turn
            else:
                del self._waiting[key]
            if not fut.done():
                fut.set_result(None)
                return
        self._busy -= 1

    async def run_slice(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread when ``key``'s turn comes."""
        await self._acquire(key)
        try:
            self.slices += 1
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self._release()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
