"""``rnnzoo serve --workers N``: N serving processes on one port sharing the state store, a
supervisor that keeps the health registry, restarts dead workers and drains them on SIGTERM;
``--workers 0`` from the affinity and the cgroup quota. Real processes, nothing mocked."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scaleout_harness import RNNZOO, Proc, free_port

from rnnzoo.cli import main
from rnnzoo.client import Client
from rnnzoo.cores import cgroup_cpu_limit, usable_cores
from rnnzoo.errors import FailedPrecondition, InvalidArgument
from rnnzoo.server.supervisor import reserve_port, worker_count

EXACT = 1e-6


def _cgroup(tmp_path, rel: str, files: dict[str, str]):
    root = tmp_path / "cgroup"
    for d, text in files.items():
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d / "cpu.max").write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"3:cpuset:/\n0::{rel}\n")
    return root, proc


def test_workers_0_counts_the_affinity_and_the_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    root, proc = _cgroup(
        tmp_path, "/a/b", {".": "max 100000", "a": "max 100000", "a/b": "150000 100000"}
    )
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert usable_cores(root, proc) == min(affinity, 2)  # 1.5 cores: two workers
    root, proc = _cgroup(tmp_path / "2", "/a/b", {"a": "50000 100000", "a/b": "400000 100000"})
    assert cgroup_cpu_limit(root, proc) == 0.5  # a parent's quota caps its children
    assert usable_cores(root, proc) == 1
    root, proc = _cgroup(tmp_path / "3", "/x", {"x": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert usable_cores(root, proc) == affinity
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "none") is None  # no cgroup v2


def test_workers_without_a_shared_store_are_refused(zoo, capsys):
    with pytest.raises(InvalidArgument, match="shared state store"):
        worker_count(2, None)
    assert worker_count(1, None) == 1
    assert worker_count(3, "/some/dir") == 3
    with pytest.raises(InvalidArgument, match=">= 0"):
        worker_count(-1, "/d")
    assert main(["serve", "--model-dir", str(zoo), "--port", "0", "--workers", "2"]) == 2
    assert "--state-store" in capsys.readouterr().err


def test_the_reserved_port_is_shared_only_by_reuseport_binds():
    held = reserve_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    try:
        with pytest.raises(FailedPrecondition, match="in use"):
            reserve_port("127.0.0.1", port)  # a second group on the port: refused
        with socket.socket() as plain, pytest.raises(OSError):  # a single server: refused
            plain.bind(("127.0.0.1", port))
        with socket.socket() as worker:  # a worker joins
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
    finally:
        held.close()
    with socket.socket() as busy:  # a port in use (no reuseport) -> the group cannot start
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(FailedPrecondition, match="pick another --port"):
            reserve_port("127.0.0.1", busy.getsockname()[1])


class Group(Proc):
    """``rnnzoo serve --workers N`` with its log (supervisor and workers, JSON lines)."""

    def __init__(self, zoo, tmp, n: int, *extra: str):
        self.port = free_port()
        args = [
            *RNNZOO,
            "serve",
            "--model-dir",
            str(zoo),
            "--port",
            str(self.port),
            "--workers",
            str(n),
            "--session-ttl",
            "0",
            "--grace",
            "1",
            "--lease-ttl",
            "2",
            # successful unary calls (CreateSession) log at debug: the tests read them
            "--log-level",
            "debug",
            *extra,
        ]
        super().__init__(args, tmp / f"group-{self.port}.log")
        self.wait_for(r"listening on 127\.0\.0\.1:\d+", 120)

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log.read_text()[after:])
            if m:
                return m
            if self.p.poll() is not None:
                raise RuntimeError(f"the group exited: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"no {pattern!r} in the log: {self.log.read_text()[-3000:]}")

    def lines(self) -> list[dict]:
        out = []
        for ln in self.log.read_text().splitlines():
            if ln.startswith("{"):
                out.append(json.loads(ln))
        return out

    def worker_pids(self) -> dict[int, int]:
        pids: dict[int, int] = {}
        for ln in self.lines():
            if ln.get("msg") == "worker ready":
                pids[ln["worker"]] = ln["pid"]
        return pids

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _health(target: str) -> int:
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def _worker_of(group: Group, rpc: str, sid: str) -> set[int]:
    short = sid[:6]
    return {
        ln["worker"]
        for ln in group.lines()
        if ln.get("rpc") == rpc and str(ln.get("session", "")).startswith(short)
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_share_sessions_restart_and_drain(zoo, tmp_path):
    """Two workers on one port and one DIR store: SERVING only with both up; a session created
    on one worker streams on the other; kill -9 of a worker: it is restarted, its leases are
    freed at once (no waiting out the 60 s lease TTL), and its sessions continue exactly;
    metrics aggregate the workers; SIGTERM drains both."""
    metrics_port = free_port()
    g = Group(
        zoo,
        tmp_path,
        2,
        "--state-store",
        str(tmp_path / "st"),
        "--metrics-port",
        str(metrics_port),
        "--lease-ttl",
        "60",
    )
    try:
        assert _health(g.target) == health_pb2.HealthCheckResponse.SERVING
        pids = g.worker_pids()
        assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
        x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
        clients = [Client(g.target, timeout=20, retry_s=30, own_connection=True) for _ in range(8)]
        ref = clients[0].infer("gru", x[None])["y"][0]
        # one session per connection, created and stepped 6 times there
        sessions = [c.session("gru") for c in clients]
        got = [[s.step(x[t]).value for t in range(6)] for s in sessions]
        for s in sessions:
            s.detach()
        # ...then each continues over another connection (another worker, for some)
        moved = []
        for i, s in enumerate(sessions):
            other = clients[(i + 1) % len(clients)].resume(s.id, "gru", 6)
            got[i] += [other.step(x[t]).value for t in range(6, 10)]
            moved.append(other)
        # the worker behind each connection: where its session was created
        conn = [_worker_of(g, "CreateSession", s.id) for s in sessions]
        assert all(len(w) == 1 for w in conn)
        crossed = [i for i in range(len(sessions)) if conn[i] != conn[(i + 1) % len(sessions)]]
        if not crossed:  # 8 connections all on one worker: 2^-7; make sure it is not a bug
            pytest.skip("every connection landed on one worker (SO_REUSEPORT hashing)")
        # a session created on one worker was streamed on the other, exactly
        for i in range(len(sessions)):
            np.testing.assert_allclose(np.concatenate(got[i]), ref[:10], atol=EXACT)

        # kill -9 worker 0 mid-session: the supervisor restarts it; sessions continue exactly
        mark = len(g.log.read_text())
        os.kill(pids[0], 9)
        g.wait_for(r'"msg": "worker died; restarting it", "worker": 0', 20, mark)
        g.wait_for(r'"msg": "worker ready", "worker": 0', 120, mark)
        g.wait_for(r'"msg": "freed the dead worker\'s leases", "worker": 0', 20, mark)
        for i, s in enumerate(moved):
            # the client retries on another connection; the supervisor freed the dead
            # worker's leases, so no retry waits for their 60 s TTL
            got[i] += [s.step(x[t]).value for t in range(len(got[i]), 16)]
            np.testing.assert_allclose(np.concatenate(got[i]), ref, atol=EXACT)
        assert sum(s.retries for s in moved) >= 1  # some streams were on the killed worker
        new = g.worker_pids()
        assert new[0] != pids[0] and not _alive(pids[0]) and new[1] == pids[1]
        assert _health(g.target) == health_pb2.HealthCheckResponse.SERVING

        # metrics: the supervisor serves the aggregate of every worker
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        created = re.search(r'rnnzoo_sessions_total\{event="created"\} ([\d.e+]+)', text)
        assert created and float(created.group(1)) >= 8, text[-2000:]
        for c in clients:
            c.close()
        live = list(g.worker_pids().values())
        assert g.term(30) == 0  # SIGTERM drains both workers
        assert not any(_alive(p) for p in live)
        assert '"msg": "stopped", "workers": 2' in g.log.read_text()
    finally:
        g.stop()
