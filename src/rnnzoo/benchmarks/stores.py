"""Write-through cost: throughput and p99 at 64 sessions, 1 step per message, for no state
store, the embedded DIR store (SQLite WAL) and Redis, measured in one run, rounds rotating
who goes first (docs/scale-out.md has the figures).

    python -m rnnzoo.benchmarks.stores [--sessions 64] [--steps 1] [--rounds 3]

Needs redis-server on PATH (scripts/setup.sh); it runs its own on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .load import run_cell
from .model import NAME as MODEL
from .model import build
from .servers import rnnzoo_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(sessions: int = 64, steps: int = 1, rounds: int = 3, duration_s: float = 3.0, log=print):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        build(d / "zoo")
        port = _free_port()
        redis = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        servers = {}
        for name, store in (
            ("none", None),
            ("dir", str(d / "st")),
            ("redis", f"redis://127.0.0.1:{port}/0"),
        ):
            srv = rnnzoo_server(d / "zoo", 64, 1.0)
            if store:
                srv.cmd += ["--state-store", store]
            servers[name] = srv
        cells: dict[str, list] = {k: [] for k in servers}
        try:
            for s in servers.values():
                s.start()
            names = list(servers)
            for i in range(rounds):
                order = names[i % 3 :] + names[: i % 3]
                for name in order:
                    srv = servers[name]
                    assert srv.proc is not None  # started above
                    r = asyncio.run(
                        run_cell(
                            srv.target,
                            MODEL,
                            sessions,
                            steps,
                            duration_s=duration_s,
                            server_pid=srv.proc.pid,
                        )
                    )
                    cells[name].append(r)
                    cpu = r.server_cpu_us_per_msg
                    log(
                        f"  {name:<6} {r.steps_per_s:9.0f} steps/s  p50 {r.p50_ms:6.2f} ms  "
                        f"p99 {r.p99_ms:6.2f} ms  server cpu/step "
                        f"{(cpu or float('nan')) / steps:6.0f} us"
                    )
        finally:
            for s in servers.values():
                s.stop()
            redis.terminate()
            redis.wait(10)
    out = {}
    for name, rs in cells.items():
        out[name] = {
            "steps_per_s": statistics.median(r.steps_per_s for r in rs),
            "p99_ms": statistics.median(r.p99_ms for r in rs),
            # server CPU (user+sys, all threads) per session-step: what the write-through
            # costs the server, less sensitive to the shared machine than throughput
            "server_cpu_us_per_step": statistics.median(
                (r.server_cpu_us_per_msg or float("nan")) / steps for r in rs
            ),
        }
    base = out["none"]["steps_per_s"]
    for name, v in out.items():
        log(
            f"{name:<6} median {v['steps_per_s']:9.0f} steps/s ({v['steps_per_s'] / base:5.1%} "
            f"of no store)  p99 {v['p99_ms']:6.2f} ms  server cpu/step "
            f"{v['server_cpu_us_per_step']:6.0f} us"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    a = p.parse_args(argv)
    run(a.sessions, a.steps, a.rounds, a.duration)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
