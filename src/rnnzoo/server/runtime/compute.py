"""Where a request's model call runs (no grpc, no torch).

Batched session steps go through the per-model batchers (batching.py); everything else that
computes lands here: a whole-sequence Infer in the shared ORT thread pool, and long work
(``long_job_steps`` or more: a long Infer or Stream chunk, a bidirectional prefix recompute,
a long prompt) in the long-job pool (``jobs.py``), never on the event loop, a streamable
sequence sliced along time with its state carried. ``malloc_trim`` follows large work
(``memory.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rnnzoo.contract import TensorSpec
from rnnzoo.errors import InvalidArgument, RnnzooError

from . import telemetry
from .caller import job_key
from .jobs import LongJobs
from .memory import LARGE_BYTES, LARGE_STEPS, Trimmer
from .model import Chunk, ServedModel
from .options import RuntimeOptions

Arrays = dict[str, np.ndarray]
RunResult = tuple[Arrays, Arrays]  # (outputs, next states)


class Compute:
    """The ORT thread pool, the long-job pool and the memory trimmer of one runtime.
    ``check()`` raises while the runtime is not serving (a long job stops between slices)."""

    def __init__(self, options: RuntimeOptions, check: Callable[[], None]):
        o = self.options = options
        self.check = check
        self.jobs = LongJobs(
            o.long_workers, o.max_long_jobs, o.max_long_jobs_per_client, o.long_nice
        )
        self._row_step_s: dict[int, float] = {}  # id(graph) -> seconds per (row x step)
        self.trimmer = Trimmer(o.malloc_trim)
        self.executor = ThreadPoolExecutor(max(1, os.cpu_count() or 1), "rnnzoo-ort")

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.jobs.shutdown()
        self.trimmer.cancel()

    async def run(
        self,
        graph: ServedModel,
        feeds: Arrays,
        states: Arrays,
        batch: int,
        length: int,
        sliceable: bool,
    ) -> RunResult:
        """A batched call: in the long-job pool when long, else in the shared executor."""
        if batch * length >= self.options.long_job_steps:
            return await self.long_run(graph, feeds, states, batch, length, sliceable)
        loop = asyncio.get_running_loop()
        timing = telemetry.TIMING.get()
        if timing is None:
            return await loop.run_in_executor(self.executor, self._ort_call, graph, feeds, states)
        queued = time.perf_counter_ns()
        return await loop.run_in_executor(
            self.executor, self._timed_ort_call, timing, queued, graph, feeds, states
        )

    def _timed_ort_call(
        self,
        timing: telemetry.Timing,
        queued: int,
        graph: ServedModel,
        feeds: Arrays,
        states: Arrays,
    ) -> RunResult:
        """``_ort_call`` in the executor, its wait for a thread and its run added to the
        request's ``timing``."""
        t0 = time.perf_counter_ns()
        timing.queue_ns += t0 - queued
        try:
            return self._ort_call(graph, feeds, states)
        finally:
            timing.infer_ns += time.perf_counter_ns() - t0

    async def long_chunk(
        self, graph: ServedModel, chunk: Chunk, state: Arrays, sliceable: bool
    ) -> RunResult:
        """One session's chunk as a long job: (batch-free outputs, batch-1 next state)."""
        feeds = graph.stack_chunks([chunk])
        outs, nxt = await self.long_run(graph, feeds, state, 1, chunk.length, sliceable)
        return graph.split_outputs(outs, 1)[0], nxt

    def _slice_steps(self, graph: ServedModel, batch: int) -> int:
        per = self._row_step_s.get(id(graph))
        if per is None:
            n = max(64, 2048 // batch)
        else:
            n = max(64, int(self.options.long_slice_s / (per * batch)))
        unit = graph.chunk.unit if graph.chunk is not None else 1  # whole chunks per slice
        return max(unit, n // unit * unit)

    async def long_run(
        self,
        graph: ServedModel,
        feeds: Arrays,
        states: Arrays,
        batch: int,
        length: int,
        sliceable: bool,
    ) -> RunResult:
        """Run in the long-job pool; a streamable graph in time slices, state carried."""
        key = job_key()
        what = f"this request ({batch} x {length} steps)"
        timing, t0 = telemetry.TIMING.get(), time.perf_counter_ns()
        try:
            return await self._long_run(key, what, graph, feeds, states, batch, length, sliceable)
        finally:
            if timing is not None:  # a long job's slices and their waits: all compute
                timing.infer_ns += time.perf_counter_ns() - t0

    async def _long_run(
        self,
        key: str,
        what: str,
        graph: ServedModel,
        feeds: Arrays,
        states: Arrays,
        batch: int,
        length: int,
        sliceable: bool,
    ) -> RunResult:
        large = graph.output_bytes(batch, length) >= LARGE_BYTES or batch * length >= LARGE_STEPS
        with self.jobs.admit(key, what), self._trim_after(large):
            if not sliceable:
                return await self.jobs.run_slice(key, self._ort_call, graph, feeds, states)
            parts, t = [], 0
            while t < length:
                self.check()
                n = min(length - t, self._slice_steps(graph, batch))
                part = _time_slice(graph.contract.inputs, feeds, t, t + n)
                outs, states = await self.jobs.run_slice(
                    key, self._timed_call, graph, part, states, batch * n
                )
                parts.append(outs)
                t += n
            if len(parts) == 1:
                return parts[0], states
            outs = await self.jobs.run_slice(key, _concat_time, graph.contract.outputs, parts)
            return outs, states

    @contextlib.contextmanager
    def _trim_after(self, large: bool) -> Iterator[None]:
        """Schedule a malloc_trim once large work ends, however it ends (memory.py)."""
        try:
            yield
        finally:
            if large:
                self.trimmer.soon()

    def _timed_call(
        self, graph: ServedModel, feeds: Arrays, states: Arrays, row_steps: int
    ) -> RunResult:
        t0 = time.perf_counter()
        res = self._ort_call(graph, feeds, states)
        per = (time.perf_counter() - t0) / row_steps
        old = self._row_step_s.get(id(graph))
        self._row_step_s[id(graph)] = per if old is None else 0.7 * old + 0.3 * per
        return res

    @staticmethod
    def _ort_call(graph: ServedModel, feeds: Arrays, states: Arrays) -> RunResult:
        try:
            return graph.run(feeds, states)
        except RnnzooError:  # ORT's failures come described whole (ServedModel.run)
            raise
        except Exception as exc:
            raise InvalidArgument(
                f"model {graph.contract.name!r} failed on this input "
                f"({type(exc).__name__}: {str(exc).strip()[:300]})"
            ) from None


def _time_slice(specs: Sequence[TensorSpec], feeds: Arrays, a: int, b: int) -> Arrays:
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


def _concat_time(specs: Sequence[TensorSpec], parts: list[Arrays]) -> Arrays:
    """Outputs of consecutive time slices -> the whole sequence's outputs."""
    out = {}
    for spec in specs:
        arrs = [p[spec.name] for p in parts]
        out[spec.name] = (
            arrs[-1] if spec.time_axis is None else np.concatenate(arrs, spec.time_axis)
        )
    return out
