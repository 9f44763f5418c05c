"""What the runtime reports for metrics: plain hook functions, no-ops until an exporter
(``rnnzoo.server.transport.metrics``, prometheus-client) installs its own. The runtime calls
them as ``telemetry.NAME(...)`` (looked up per call), so it never imports an exporter.

- ``ort_run(model, seconds)``: one ONNX Runtime call (every path: batcher, Infer, long jobs);
- ``batch(model, size, queue_delays_s)``: one batched call of the batcher, and how long each
  of its chunks waited in the queue;
- ``session(event, model)``: ``created``, or how a session ended: ``closed``, ``expired``,
  ``evicted`` (the first word of its tombstone).

Per request, a transport that wants the server-side breakdown (KServe ModelStatistics: queue
and compute_infer) sets ``TIMING`` to a fresh ``Timing`` in the request's task; the batcher
(for steps) and ``Compute`` (for whole-sequence calls) add the time the request's work
waited and ran to it. Unset (the default), nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


def _noop(*args: Any) -> None:
    return None


ort_run: Callable[[str, float], None] = _noop
batch: Callable[[str, int, list[float]], None] = _noop
session: Callable[[str, str], None] = _noop


@dataclass(slots=True)
class Timing:
    """One request's server-side time: waiting for its ORT call, and in it (a batched call's
    whole duration counts for each request in it, as Triton counts compute_infer)."""

    queue_ns: int = 0
    infer_ns: int = 0


TIMING: ContextVar[Timing | None] = ContextVar("rnnzoo_request_timing", default=None)
