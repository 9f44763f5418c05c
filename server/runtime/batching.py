"""Per-model batcher: pending chunks of different sequences -> one ORT call.

- at most one chunk per key (session) per batch; a key's later chunks wait, in order;
- chunks are grouped by length: equal-length chunks run together, so nothing is padded and
  no state ever sees a padding step (padding a recurrent net changes its state);
- ``max_batch`` caps a call; ``max_delay_ms`` > 0 waits that long for more work once the
  first chunk arrives; 0 batches what is already waiting (work that queued up while the
  previous batch ran);
- a group whose ORT call fails is retried member by member, so good sequences still get
  their results and only the bad one gets an error. The batcher never writes a session's
  state: callers replace it only after a successful result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from rnnzoo.errors import InvalidArgument, RnnzooError, Unavailable

from .model import Chunk, ServedModel

Result = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # batch-free outputs, batch-1 states


@dataclass
class _Job:
    key: object
    chunk: Chunk
    state: dict[str, np.ndarray]
    future: asyncio.Future


class Batcher:
    def __init__(
        self, model: ServedModel, executor: Executor, max_batch: int = 64, max_delay_ms: float = 0.0
    ) -> None:
        assert max_batch >= 1 and max_delay_ms >= 0
        self.model = model
        self.executor = executor
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        self._queue: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._busy = False
        self.calls = 0  # successful ORT calls made (for tests and stats)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # the most recent calls' sizes

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, key: object, chunk: Chunk, state: dict[str, np.ndarray]) -> Result:
        if self._task is None or self._task.done():
            raise Unavailable("the server is not running; retry against a running server")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(key, chunk, state, fut))
        self._wake.set()
        return await fut

    @property
    def idle(self) -> bool:
        return not self._queue and not self._busy

    async def stop(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(Unavailable("the server stopped before this step ran"))

    def _take(self) -> list[_Job]:
        """Up to max_batch jobs, the first of each key; the rest stay queued in order."""
        taken, keys, rest = [], set(), deque()
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():  # the caller went away
                continue
            if len(taken) < self.max_batch and job.key not in keys:
                taken.append(job)
                keys.add(job.key)
            else:
                rest.append(job)
        self._queue = rest
        return taken

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.max_delay_s > 0 and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.max_delay_s)
            else:
                await asyncio.sleep(0)  # let coroutines that are ready enqueue too
            jobs = self._take()
            if not jobs:
                continue
            self._busy = True
            try:
                results = await loop.run_in_executor(self.executor, self._run_jobs, jobs)
            except Exception as exc:  # the executor itself failed: fail these jobs only
                results = [exc] * len(jobs)
            finally:
                self._busy = False
            for job, res in zip(jobs, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(res, BaseException):
                    job.future.set_exception(res)
                else:
                    job.future.set_result(res)

    # ---- runs in the executor thread ------------------------------------------------
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
        feeds = m.stack_chunks([j.chunk for j in jobs])
        states = m.stack_states([j.state for j in jobs])
        outs, nxt = m.run(feeds, states)
        self.calls += 1
        self.batch_sizes.append(len(jobs))
        return list(
            zip(m.split_outputs(outs, len(jobs)), m.split_states(nxt, len(jobs)), strict=True)
        )

    def _wrap(self, exc: Exception) -> Exception:
        if isinstance(exc, RnnzooError):
            return exc
        return InvalidArgument(
            f"model {self.model.contract.name!r} failed on this input "
            f"({type(exc).__name__}: {str(exc).strip()[:300]}); the session state is unchanged"
        )
