"""The grpc.aio server: rnnzoo service + health + reflection, size limits, graceful stop.

Lifecycle, as health reports it (``grpc.health.v1``, overall "" and "rnnzoo.v1.Rnnzoo"):
  start()  -> bound and answering, NOT_SERVING (the rnnzoo service answers UNAVAILABLE)
  load(rt) -> runtime started, SERVING (with a state store: while it answers; NOT_SERVING
              while it is unreachable or broken, SERVING again when it is back:
              ``store_health.py``)
  stop()   -> NOT_SERVING, no new RPCs; in-flight ones get ``grace_s``; then the runtime stops.

Overload and dead peers (docs/limits.md):
- our admission control (``admission.py``) refuses calls over its limits with
  RESOURCE_EXHAUSTED; grpc's own pending-request queue and ``maximum_concurrent_rpcs`` are
  set well above it (grpc's defaults silently CANCELLED bursts of a few thousand calls);
- keepalive: the server pings each connection after ``keepalive_time_s`` without traffic and
  closes it if no answer comes within ``keepalive_timeout_s``: the calls of a dead or frozen
  peer end, and its streams' sessions are detached.

Security (docs/limits.md, "Security"): TLS (``tls_cert``/``tls_key``), mTLS
(``tls_client_ca``: clients must present a certificate it signed), bearer tokens
(``auth_tokens``) and the request-rate quota are decided by ``guard.Guard`` and applied
first in every call (every service but health) by the one interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnnzoo.errors import FailedPrecondition, Unavailable
from rnnzoo.proto.inference.v2 import grpc_service_pb2 as kpb
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.server import heap
from rnnzoo.server.runtime import Runtime, RuntimeOptions
from rnnzoo.server.runtime.control import RepositoryControl
from rnnzoo.server.runtime.repository import LoadOptions

from . import metrics
from .admission import Admission
from .codec import add_servicer
from .config import MB, ServerConfig
from .interceptors import ErrorInterceptor
from .kserve import KServeServicer
from .logs import log
from .servicer import RnnzooServicer
from .store_health import StoreHealth

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

LOG = logging.getLogger("rnnzoo.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Rnnzoo"].full_name  # "rnnzoo.v1.Rnnzoo"
KSERVICE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]  # KServe v2 / Triton
RESPONSE_OVERHEAD = 64 << 10  # a response's bytes beyond its tensors' data (names, shapes)


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


class _Unloaded:
    """Stands in for the runtime until ``load``: every call is UNAVAILABLE."""

    def __getattr__(self, name: str):
        raise Unavailable("the server is still loading its models; retry in a moment")


class RnnzooServer:
    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.config.check()
        # Health says SERVING once the runtime is loaded and the gate is open: always for one
        # server; a worker's opens when its supervisor says every worker is up (server/supervisor.py)
        self.gate_open = True
        self.store_health: StoreHealth | None = None  # with a state store: is it answering?
        self.runtime: Runtime | None = None
        self.control: RepositoryControl | None = None
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        size = int(self.config.max_message_mb * MB)
        self.servicer = RnnzooServicer(_Unloaded(), size)  # type: ignore[arg-type]
        self.admission = Admission(self.config.admission)
        self._metrics: WSGIServer | None = None  # the Prometheus HTTP server (config.metrics_port)
        self.metrics_port: int | None = None
        self.guard = self.config.guard()  # first in every call: refused callers reach nothing
        self._credentials = self.config.credentials()
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(self.admission, self.guard)],
            options=self.config.grpc_options(),
            maximum_concurrent_rpcs=2 * self.config.admission.max_rpcs,  # above ours
        )
        add_servicer(self.servicer, self.server)
        # KServe v2 / Triton (inference.GRPCInferenceService) on the same port and runtime
        self.kserve = KServeServicer(_Unloaded(), size)
        add_servicer(self.kserve, self.server, KSERVICE, kpb)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE, KSERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME],
            self.server,
        )

    @property
    def target(self) -> str:
        assert self.port is not None, "start() the server first"
        return f"{self.config.host}:{self.port}"

    async def _set_health(self, status) -> None:
        # Triton answers for its own service name too; health clients of Triton ask for it
        for name in ("", SERVICE, KSERVICE.full_name):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind and start answering (NOT_SERVING until ``load``). Returns the port."""
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self._credentials is not None:
                self.port = self.server.add_secure_port(address, self._credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            self.port = 0
            why = str(exc)
        else:
            why = "the port is in use or the host is not an address of this machine"
        if not self.port:
            await self.server.stop(None)
            raise FailedPrecondition(f"cannot listen on {address} ({why}); pick another --port")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.metrics_port is not None:
            try:
                self._metrics = metrics.start_exporter(self.config.metrics_port, self.config.host)
            except OSError as exc:
                await self.server.stop(None)
                raise FailedPrecondition(
                    f"cannot serve metrics on {self.config.host}:{self.config.metrics_port} "
                    f"({exc.strerror}); pick another --metrics-port"
                ) from None
            metrics.install()
            self.metrics_port = self._metrics.server_port
            log(LOG, "metrics", host=self.config.host, port=self.metrics_port)
        elif self.config.record_metrics:
            metrics.install()  # a worker: the supervisor serves the aggregate
        await self.server.start()
        auth = (
            "tokens"
            if self.guard.tokens
            else "certificates"
            if self.guard.authenticating
            else "none"
        )
        log(LOG, "bound", host=self.config.host, port=self.port, tls=self.config.tls, auth=auth)
        missing = [
            w for w, on in (("TLS", self.config.tls), ("authentication", auth != "none")) if not on
        ]
        if missing and not _loopback(self.config.host):
            log(
                LOG,
                f"INSECURE: listening beyond this machine without {' or '.join(missing)}: "
                + (
                    "anyone who can reach this port can use every model and any session whose "
                    "id they learn. "
                    if auth == "none"
                    else "tokens and session ids cross the network in clear text. "
                )
                + "Use --tls-cert/--tls-key with --auth-tokens (or --tls-client-ca), or bind "
                "127.0.0.1",
                logging.WARNING,
                host=self.config.host,
            )
        return self.port

    async def load(self, runtime: Runtime) -> None:
        """Start the runtime and serve it. Its outputs are capped to what fits a message (less
        room for the response's own fields); its options are left as given."""
        size = self.servicer.max_response_bytes
        runtime.cap_output_bytes(size - min(RESPONSE_OVERHEAD, size // 4))
        await runtime.start()
        if self.guard.rate is not None and runtime.state_store.shared:
            self.guard.rate.share(runtime.state_store)  # N processes: one quota
        self.runtime = runtime
        self.servicer.rt = runtime
        self.kserve.rt = runtime
        self.control = RepositoryControl(runtime)  # model versions while serving
        self.control.start()
        self.kserve.control = self.control

        def ready_gauge() -> None:  # rnnzoo_model_ready follows versions coming and going
            repo = runtime.repo
            metrics.models_loaded([n for n in repo.table if repo.latest(n) is not None])
            metrics.models_loaded([n for n in repo.table if repo.latest(n) is None], ready=False)

        self.control.on_change = ready_gauge
        metrics.KNOWN = lambda name: name in runtime.repo.table
        if getattr(runtime.state_store, "ping", None) is not None:
            self.store_health = StoreHealth(runtime.state_store, self._store_changed)
            ok, why = await self.store_health.probe()
            if not ok:
                self.store_health.ok, self.store_health.why = False, why
                log(LOG, "state store failing: NOT_SERVING", logging.ERROR, reason=why)
            self.store_health.start()
        if self._serving():
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        models = [m.name for m in runtime.list_models()]
        metrics.models_loaded(models)
        metrics.models_loaded(runtime.repo.failed, ready=False)
        for name, why in sorted(runtime.repo.failed.items()):
            log(LOG, "model not served", logging.ERROR, model=name, reason=why)
        log(LOG, "serving", target=self.target, models=models)

    def _serving(self) -> bool:
        """SERVING: gate open (every worker up) and the state store (if any) answering."""
        store_ok = self.store_health is None or self.store_health.ok
        return self.gate_open and store_ok

    async def _store_changed(self, ok: bool, why: str) -> None:
        if self.runtime is not None and self.runtime.ready:
            status = health_pb2.HealthCheckResponse
            await self._set_health(status.SERVING if self._serving() else status.NOT_SERVING)

    async def set_gate(self, open_: bool) -> None:
        """Open or close the health gate (a worker: are all workers up?)."""
        self.gate_open = open_
        if self.runtime is not None and self.runtime.ready:
            status = health_pb2.HealthCheckResponse
            await self._set_health(status.SERVING if self._serving() else status.NOT_SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.config.grace_s if grace_s is None else grace_s
        log(LOG, "stopping", grace_s=grace)
        await self.health.enter_graceful_shutdown()  # NOT_SERVING, and stays so
        if self.store_health is not None:
            await self.store_health.stop()
        await self.server.stop(grace)
        if self.control is not None:
            await self.control.stop()
        if self.runtime is not None:
            await self.runtime.stop(grace)
            metrics.models_loaded(self.runtime.repo.entries, ready=False)
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None
        log(LOG, "stopped")


async def serve(
    model_dir: str | Path,
    options: RuntimeOptions,
    config: ServerConfig,
    ready=print,
    fleet=None,
    load: LoadOptions | None = None,
) -> None:
    """Serve ``model_dir`` until SIGTERM/SIGINT, then stop gracefully. ``fleet``: a worker's
    link to its supervisor (workers.FleetLink): health stays NOT_SERVING until the supervisor
    says all workers are up, and the worker stops when the supervisor goes away."""
    server = RnnzooServer(config)
    stop = asyncio.Event()
    if fleet is not None:
        server.gate_open = False
        fleet.start(asyncio.get_running_loop(), server.set_gate, stop.set)
    await server.start()
    try:
        runtime = await asyncio.to_thread(Runtime.from_dir, model_dir, options, load)
        await server.load(runtime)
        heap.settle()  # start-up's objects out of the collector's sight (heap.py)
        ready(f"listening on {server.target}", flush=True)
        if server.metrics_port is not None:
            ready(f"metrics on http://{config.host}:{server.metrics_port}/metrics", flush=True)
        await _until_signal(stop)
    finally:
        await server.stop()


async def _until_signal(stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class BackgroundServer:
    """A server on its own event loop in a thread, for synchronous callers (tests, bench)."""

    def __init__(self, runtime_factory, config: ServerConfig | None = None) -> None:
        self._factory = runtime_factory  # () -> Runtime, called in the server's thread
        self.config = config or ServerConfig(port=0)
        self.loop = asyncio.new_event_loop()
        self.server: RnnzooServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.server = RnnzooServer(self.config)
        await self.server.start()
        await self.server.load(self._factory())

    def start(self) -> BackgroundServer:
        self._thread.start()
        try:
            self._call(self._start())
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def target(self) -> str:
        assert self.server is not None
        return self.server.target

    @property
    def runtime(self) -> Runtime:
        assert self.server is not None and self.server.runtime is not None
        return self.server.runtime

    def stop(self, grace_s: float = 1.0) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self._call(self.server.stop(grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
