"""``rnnzoo serve --workers N``: N serving processes on one port, kept by one supervisor.

One ``rnnzoo serve`` process runs one event-loop thread, so it uses one core. With
``--workers N`` the command becomes a supervisor that starts N worker processes (each a whole
server: runtime, batchers, gRPC), and shares them out as follows.

- **One port, SO_REUSEPORT.** The supervisor binds the port first with SO_REUSEPORT off, so a
  port already in use (by anything, a single-process ``rnnzoo serve`` or another supervisor's
  group included) fails the start as it always did. Then it turns SO_REUSEPORT on for that
  socket and keeps it bound but never listening (it gets no connections): the port stays
  reserved while workers come and go, and each worker binds the same port with
  ``grpc.so_reuseport=1``. The kernel spreads new *connections* over the listening workers;
  all calls of one connection go to one worker, so a client needs several connections
  (channels) to use several workers.
- **Any worker serves any session**, through the shared state store (``--state-store``, a
  directory or Redis; ``store.py``): sessions, leases and fencing are already per store, not
  per process. Without a store ``--workers`` > 1 is refused: N private session tables behind
  one port would lose each session on three connections out of four.
- **Health: the supervisor keeps the registry.** Each worker reports "listening" to the
  supervisor (its stdout) once its models are loaded, and reports NOT_SERVING on its own
  health service until the supervisor tells it (its stdin) that all N are up. When a worker
  dies the supervisor tells the others "not serving" until its replacement is up; a health
  check, whichever worker it lands on, therefore says SERVING only while all workers are up.
  The supervisor prints ``listening on HOST:PORT`` once all are up, as a single server does.
- **SIGTERM (or SIGINT) drains all workers**: the supervisor forwards SIGTERM, each worker stops
  gracefully (health NOT_SERVING, in-flight calls get ``--grace``, leases released), and the
  supervisor waits for them, killing one only if it overruns its grace by 15 s.
- **A dead worker is restarted.** Its streams' clients see UNAVAILABLE; the client library
  retries by position on a new connection (another worker), which takes the session's lease
  and continues from the stored state (the same path as a replica dying behind nginx,
  docs/scale-out.md). The supervisor, having reaped the dead worker, frees its leases in the
  store at once (holder ids carry their process's tag: ``lease.process_tag``), so the retry
  does not wait for ``--lease-ttl``; a replica that dies behind nginx has no supervisor, and
  there the lease runs out. A worker that dies within ``FAST_FAIL_S`` of its start
  ``MAX_FAST_FAILS`` times in a row stops the group.
- **Orphans stop**: a worker whose stdin closes (the supervisor died, even by ``kill -9``)
  stops gracefully.
- **Metrics**: with ``--metrics-port`` the supervisor makes a private
  ``PROMETHEUS_MULTIPROC_DIR`` for its workers (prometheus-client's multiprocess mode) and
  serves the aggregate itself; a dead worker's live gauges are dropped (``mark_process_dead``).
- ``--workers 0``: one per usable core (``usable_cores``): the CPU affinity, capped by the
  cgroup v2 ``cpu.max`` quota, not ``os.cpu_count()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rnnzoo.cores import usable_cores
from rnnzoo.errors import FailedPrecondition, InvalidArgument
from rnnzoo.server.runtime.lease import process_tag
from rnnzoo.server.runtime.store import open_store
from rnnzoo.server.transport.logs import log

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from rnnzoo.server.runtime.options import RuntimeOptions
    from rnnzoo.server.runtime.repository import LoadOptions
    from rnnzoo.server.runtime.store import StateStore
    from rnnzoo.server.transport.config import ServerConfig

LOG = logging.getLogger("rnnzoo.workers")
READY = "listening on "
FAST_FAIL_S = 10.0  # a worker that dies this soon after its start...
MAX_FAST_FAILS = 5  # ...this many times in a row stops the group (it cannot start)
KILL_AFTER_GRACE_S = 15.0


# ---- how many workers: usable cores (rnnzoo.cores) ------------------------------------------
def worker_count(requested: int, state_store: str | None) -> int:
    """``--workers``: 0 = one per usable core; > 1 needs a shared state store."""
    if requested < 0:
        raise InvalidArgument(f"--workers must be >= 0 (0 = one per usable core), got {requested}")
    n = requested or usable_cores()
    if n > 1 and not state_store:
        raise InvalidArgument(
            f"--workers {requested} runs {n} serving processes, which must share their "
            "sessions: give a shared state store (--state-store DIR or redis://...). Without "
            "one each process would keep its own sessions and a client's next connection "
            "would find its session missing"
        )
    return n


# ---- the port: reserved by the supervisor, shared by the workers ------------------------------
def reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with SO_REUSEPORT off (a port in use fails, as for one server), then
    turn SO_REUSEPORT on and keep the socket bound, never listening: workers join the port with
    SO_REUSEPORT while it stays reserved. ``port`` 0 picks a free one."""
    name = host.strip("[]")
    try:
        info = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise FailedPrecondition(
            f"cannot listen on {host}:{port} ({exc}); pick another --host"
        ) from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        sock.bind(info[4])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(
            f"cannot listen on {host}:{port} ({exc.strerror}: the port is in use or the host is "
            "not an address of this machine); pick another --port"
        ) from None
    return sock


# ---- the worker side ---------------------------------------------------------------------------
class FleetLink:
    """A worker's line to its supervisor: stdin says "serving" / "not-serving"; EOF (the
    supervisor is gone) stops the worker."""

    def __init__(self, index: int, stream=None) -> None:
        self.index = index
        self.stream = stream or sys.stdin

    def start(self, loop: asyncio.AbstractEventLoop, set_serving, stop) -> None:
        def read() -> None:
            for line in self.stream:
                word = line.strip()
                if word in ("serving", "not-serving"):
                    fut = asyncio.run_coroutine_threadsafe(set_serving(word == "serving"), loop)
                    with contextlib.suppress(Exception):
                        fut.result(10)
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(stop)

        threading.Thread(target=read, name="rnnzoo-fleet", daemon=True).start()


def spec_of(
    model_dir: str | Path,
    options: RuntimeOptions,
    config: ServerConfig,
    log_level: str,
    load: LoadOptions,
) -> dict[str, Any]:
    """What a worker needs to build its server (one JSON line on its stdin)."""
    return {
        "model_dir": str(model_dir),
        "options": dataclasses.asdict(options),
        "config": dataclasses.asdict(config),
        "log_level": log_level,
        "load": dataclasses.asdict(load),
    }


def worker_main() -> int:
    """``python -m rnnzoo.server.supervisor``: one worker, configured by its first stdin
    line (``spec_of`` + ``index``, ``port``, ``metrics``)."""
    from rnnzoo.server.runtime import RuntimeOptions
    from rnnzoo.server.runtime.repository import ControlOptions, LoadOptions
    from rnnzoo.server.transport.admission import AdmissionLimits
    from rnnzoo.server.transport.logs import configure
    from rnnzoo.server.transport.server import ServerConfig, serve

    spec = json.loads(sys.stdin.readline())
    index = spec["index"]
    configure(getattr(logging, spec["log_level"].upper()), fields={"worker": index})
    cfg = dict(spec["config"])
    cfg["admission"] = AdmissionLimits(**cfg["admission"])
    cfg.update(port=spec["port"], metrics_port=None, reuseport=True, record_metrics=spec["metrics"])
    config = ServerConfig(**cfg)
    load = dict(spec["load"])
    control = dict(load.pop("control"))
    control["load_models"] = tuple(control["load_models"])
    load_options = LoadOptions(**load, control=ControlOptions(**control))
    options = RuntimeOptions(**spec["options"])
    asyncio.run(
        serve(spec["model_dir"], options, config, fleet=FleetLink(index), load=load_options)
    )
    return 0


# ---- the supervisor ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    started: float = 0.0
    fast_fails: int = 0
    restarts: int = 0


class Supervisor:
    def __init__(
        self,
        n: int,
        spec: dict,
        host: str,
        port: int,
        grace_s: float,
        metrics_port: int | None = None,
        ready=print,
    ) -> None:
        assert n >= 1
        self.n = n
        self.spec = spec
        self.host = host
        self.port = port
        self.grace_s = grace_s
        self.metrics_port = metrics_port
        self.ready_cb = ready
        self.workers = [_Worker(i) for i in range(n)]
        self.stopping = False
        self.failed: str | None = None
        self.announced = False
        self._sock: socket.socket | None = None
        self._metrics_dir: str | None = None
        self._exporter: WSGIServer | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._store: StateStore | None = None  # the shared state store, opened when a worker dies

    @property
    def all_ready(self) -> bool:
        return all(w.ready for w in self.workers)

    async def run(self) -> int:
        self._sock = reserve_port(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            if self.metrics_port is not None:
                self._metrics_dir = tempfile.mkdtemp(prefix="rnnzoo-metrics-")
                env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
                self._start_exporter()
            self._env = env
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            log(LOG, "supervisor", workers=self.n, host=self.host, port=self.port)
            self._tasks = [loop.create_task(self._keep(w)) for w in self.workers]
            await self._stop.wait()
        finally:
            await self._shutdown()
        if self.failed:
            raise FailedPrecondition(self.failed)
        return 0

    def _start_exporter(self) -> None:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)
        try:
            self._exporter, _ = start_http_server(
                cast(int, self.metrics_port), addr=self.host, registry=registry
            )
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot serve metrics on {self.host}:{self.metrics_port} ({exc.strerror}); "
                "pick another --metrics-port"
            ) from None

    async def _spawn(self, w: _Worker) -> None:
        w.ready = False
        w.started = time.monotonic()
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rnnzoo.server.supervisor",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._env,
        )
        spec = dict(self.spec, index=w.index, port=self.port, metrics=self.metrics_port is not None)
        assert w.proc.stdin is not None  # stdin=PIPE
        w.proc.stdin.write((json.dumps(spec) + "\n").encode())
        await w.proc.stdin.drain()
        log(LOG, "worker started", worker=w.index, pid=w.proc.pid)

    async def _keep(self, w: _Worker) -> None:
        """Run worker ``w``; restart it whenever it dies, until the group stops."""
        while not self.stopping:
            await self._spawn(w)
            proc = w.proc
            assert proc is not None and proc.stdout is not None  # _spawn set it; stdout=PIPE
            async for raw in proc.stdout:  # until the worker exits (its stdout closes)
                line = raw.decode(errors="replace")
                if line.startswith(READY) and not w.ready:
                    w.ready = True
                    log(LOG, "worker ready", worker=w.index, pid=proc.pid)
                    await self._tell_all()
            code = await proc.wait()
            w.ready = False
            self._mark_dead(proc.pid)
            if self.stopping:
                return
            await self._free_leases(w, proc.pid)
            quick = time.monotonic() - w.started < FAST_FAIL_S
            w.fast_fails = w.fast_fails + 1 if quick else 0
            w.restarts += 1
            log(
                LOG,
                "worker died; restarting it",
                logging.WARNING,
                worker=w.index,
                pid=proc.pid,
                code=code,
                restarts=w.restarts,
            )
            await self._tell_all()
            if w.fast_fails >= MAX_FAST_FAILS:
                self.failed = (
                    f"worker {w.index} exited {w.fast_fails} times within {FAST_FAIL_S:g} s of "
                    f"its start (last exit code {code}); its log lines above say why"
                )
                self._stop.set()
                return
            if quick:
                await asyncio.sleep(min(5.0, 0.2 * 2**w.fast_fails))

    async def _tell_all(self) -> None:
        """Every worker: "serving" if all are up, else "not-serving"; announce once."""
        word = b"serving\n" if self.all_ready else b"not-serving\n"
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None and w.ready:
                assert w.proc.stdin is not None  # stdin=PIPE (_spawn)
                with contextlib.suppress(ConnectionError, RuntimeError):
                    w.proc.stdin.write(word)
                    await w.proc.stdin.drain()
        if self.all_ready and not self.announced:
            self.announced = True
            self.ready_cb(f"{READY}{self.host}:{self.port}", flush=True)
            if self._exporter is not None:
                port = self._exporter.server_port
                self.ready_cb(f"metrics on http://{self.host}:{port}/metrics", flush=True)
            log(LOG, "serving", workers=self.n, host=self.host, port=self.port)

    async def _free_leases(self, w: _Worker, pid: int) -> None:
        """The dead worker's streams renew nothing: free its leases in the shared store now,
        so its clients' retries attach at once instead of after ``--lease-ttl``. Safe: the
        process is reaped, so none of its writes can land later (and the next holder's epoch
        fences them anyway)."""
        url = self.spec["options"].get("state_store")
        if not url:
            return
        try:
            if self._store is None:
                self._store = open_store(url)
            n = await self._store.release_holders(process_tag(pid) + ":")
        except Exception as exc:  # an unreachable store: the leases run out by themselves
            log(
                LOG,
                "could not free the dead worker's leases; they run out by themselves",
                logging.WARNING,
                worker=w.index,
                pid=pid,
                error=str(exc)[:300],
            )
            return
        log(LOG, "freed the dead worker's leases", worker=w.index, pid=pid, leases=n)

    def _mark_dead(self, pid: int) -> None:
        if self._metrics_dir is not None:
            from prometheus_client import multiprocess

            with contextlib.suppress(Exception):
                multiprocess.mark_process_dead(pid, self._metrics_dir)

    async def _shutdown(self) -> None:
        """SIGTERM every worker, wait for their graceful stop (killing overruns), clean up."""
        self.stopping = True
        log(LOG, "stopping", workers=self.n, grace_s=self.grace_s)
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = self.grace_s + KILL_AFTER_GRACE_S
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), deadline)
            except TimeoutError:
                log(LOG, "worker overran its grace; killing it", logging.WARNING, pid=p.pid)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._exporter is not None:
            self._exporter.shutdown()
            self._exporter.server_close()
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self._sock is not None:
            self._sock.close()
        if self._store is not None:
            await self._store.close()
        log(LOG, "stopped", workers=self.n)


if __name__ == "__main__":
    sys.exit(worker_main())
