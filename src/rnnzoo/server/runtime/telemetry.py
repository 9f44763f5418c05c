"""What the runtime reports for metrics: plain hook functions, no-ops until an exporter
(``rnnzoo.server.transport.metrics``, prometheus-client) installs its own. The runtime calls
them as ``telemetry.NAME(...)`` (looked up per call), so it never imports an exporter.

- ``ort_run(model, seconds)``: one ONNX Runtime call (every path: batcher, Infer, long jobs);
- ``batch(model, size, queue_delays_s)``: one batched call of the batcher, and how long each
  of its chunks waited in the queue;
- ``session(event, model)``: ``created``, or how a session ended: ``closed``, ``expired``,
  ``evicted`` (the first word of its tombstone).
"""

from __future__ import annotations


def _noop(*args) -> None:
    return None


ort_run = _noop
batch = _noop
session = _noop
