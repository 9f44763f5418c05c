"""Prometheus metrics (``rnnzoo serve --metrics-port N``), series prefixed ``rnnzoo_``.

- ``rnnzoo_requests_total`` / ``rnnzoo_request_seconds`` by ``rpc``, ``protocol``
  (``rnnzoo.v1`` or ``kserve``), ``code`` (the gRPC status name), ``model`` and ``version``
  (empty when the call named no served model, or no version was resolved: labels never come
  from arbitrary client strings). Streams count per
  message: each message of Stream / ModelStreamInfer is one request with its own code and
  latency (ModelStreamInfer's in-band errors included); a Stream that ends with an error
  counts that error once. ``rnnzoo_streams_total`` counts the stream calls themselves.
- ``rnnzoo_sessions_open``; ``rnnzoo_sessions_total`` by ``event``: ``created``, ``closed``,
  ``expired``, ``evicted`` (sequences are sessions: a sequence_end is ``closed``).
- ``rnnzoo_batch_size`` and ``rnnzoo_queue_delay_seconds`` histograms (the batcher), per model;
- ``rnnzoo_ort_run_seconds`` per model (every ONNX Runtime call);
- ``rnnzoo_model_ready`` per model (1 served, 0 not).

The series live in prometheus-client's default registry, fed by the runtime's telemetry hooks
(``runtime/telemetry.py``) and the interceptor. Several serving processes: set
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) before they start; the
exporter then serves the aggregate of every process from that directory, and the open-sessions
gauge is summed over live processes.

No ``*_created`` series: prometheus-client's per-series creation timestamps read like counts
on a dashboard and double the series; ``install`` turns them off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client import start_http_server as _start_http_server

from rnnzoo.server.runtime import telemetry

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

PER_MESSAGE = frozenset({"Stream", "StepMany", "ModelStreamInfer"})
ENABLED = False  # set by install(): until then recording costs one check
_LATENCY = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)

_LABELS = ["rpc", "protocol", "code", "model", "version"]
REQUESTS = Counter("rnnzoo_requests", "Requests (stream messages counted one by one)", _LABELS)
LATENCY = Histogram(
    "rnnzoo_request_seconds", "Request latency (per message for streams)", _LABELS, buckets=_LATENCY
)
# Is this a served model's name? (server.load points it at the runtime's repository)
KNOWN: Callable[[str], bool] = lambda name: False  # noqa: E731
STREAMS = Counter(
    "rnnzoo_streams", "Streaming calls, by how they ended", ["rpc", "protocol", "code"]
)
SESSIONS_OPEN = Gauge("rnnzoo_sessions_open", "Live sessions", multiprocess_mode="livesum")
SESSIONS = Counter(
    "rnnzoo_sessions", "Session events: created, closed, expired, evicted", ["event"]
)
BATCH_SIZE = Histogram(
    "rnnzoo_batch_size", "Chunks per batched ORT call", ["model"], buckets=_BATCH
)
QUEUE_DELAY = Histogram(
    "rnnzoo_queue_delay_seconds", "Time a chunk waited for its batch", ["model"], buckets=_LATENCY
)
ORT_RUN = Histogram("rnnzoo_ort_run_seconds", "ONNX Runtime call time", ["model"], buckets=_LATENCY)
MODEL_READY = Gauge(
    "rnnzoo_model_ready",
    "1: the model is served; 0: it is not",
    ["model"],
    multiprocess_mode="max",
)


def request(
    rpc: str, protocol: str, code: str, seconds: float, model: str = "", version: str = ""
) -> None:
    """``model``: a name, or a version's key ``NAME@VERSION``."""
    if not ENABLED:
        return
    if model and not version:
        name, sep, v = model.rpartition("@")
        if sep and v.isdigit() and KNOWN(name):
            model, version = name, v
    if not KNOWN(model):
        model = version = ""
    REQUESTS.labels(rpc, protocol, code, model, version).inc()
    LATENCY.labels(rpc, protocol, code, model, version).observe(seconds)


def call_ended(
    rpc: str, protocol: str, code: str, seconds: float, model: str = "", version: str = ""
) -> None:
    """The interceptor's end of a call: a unary call is one request; a per-message stream
    counts as a stream (its messages were counted as they went), and its error, if it ended
    with one, as one failed request."""
    if not ENABLED:
        return
    if rpc in PER_MESSAGE:
        STREAMS.labels(rpc, protocol, code).inc()
        if code not in ("OK", "CANCELLED"):
            request(rpc, protocol, code, seconds, model, version)
        return
    request(rpc, protocol, code, seconds, model, version)


def _session(event: str, model: str) -> None:
    # the first word of how it ended: "ended by sequence_end ..." is a close too
    if event not in ("created", "expired", "evicted"):
        event = "closed"
    SESSIONS.labels(event).inc()
    SESSIONS_OPEN.inc() if event == "created" else SESSIONS_OPEN.dec()


def _batch(model: str, size: int, delays: list[float]) -> None:
    BATCH_SIZE.labels(model).observe(size)
    q = QUEUE_DELAY.labels(model)
    for d in delays:
        q.observe(d)


def _ort_run(model: str, seconds: float) -> None:
    ORT_RUN.labels(model).observe(seconds)


def install() -> None:
    """Start recording: the interceptor's and servicers' calls, and the runtime's telemetry
    hooks routed here (idempotent; process-wide, like prometheus-client's registry)."""
    global ENABLED
    ENABLED = True
    disable_created_metrics()
    telemetry.session, telemetry.batch, telemetry.ort_run = _session, _batch, _ort_run


def models_loaded(names, ready: bool = True) -> None:
    for n in names:
        MODEL_READY.labels(n).set(1 if ready else 0)


def start_exporter(port: int, host: str = "127.0.0.1") -> WSGIServer:
    """Serve /metrics over HTTP; returns the HTTP server (``.server_port``, ``.shutdown()``)."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    server, _thread = _start_http_server(port, addr=host, registry=registry)
    return server
