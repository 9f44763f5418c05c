"""Servers under test, each started as its own process: client and server never share a GIL.

``rnnzoo serve --port 0`` is the real CLI (batching on, or ``--max-batch 1`` for the naive
server); the echo server is ``python -m rnnzoo.benchmarks.echo_server``. Both print
``listening on HOST:PORT`` when ready, which is how the target is read.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rnnzoo.errors import Unavailable

READY = "listening on "


class ServerProcess:
    """A server subprocess; ``with ServerProcess(cmd) as s: s.target``."""

    def __init__(self, cmd: list[str], name: str, start_timeout_s: float = 120.0) -> None:
        self.cmd = cmd
        self.name = name
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.target = ""

    def start(self) -> ServerProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # stderr to a file, not a pipe: a full pipe would block the server mid-benchmark.
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env
        )
        assert self.proc.stdout is not None  # stdout=PIPE
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.start_timeout_s
        seen: list[str] = []
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = self.proc.stdout.readline()
                if line.startswith(READY):
                    self.target = line[len(READY) :].strip()
                    return self
                if line:
                    seen.append(line)
            if self.proc.poll() is not None:
                break
        err = self._stop_and_read_stderr()
        raise Unavailable(
            f"{self.name} server did not print '{READY}HOST:PORT' "
            f"(command: {' '.join(self.cmd)}); stdout: {''.join(seen)[-500:]!r}; "
            f"stderr: {err[-1500:]!r}"
        )

    def _stop_and_read_stderr(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.seek(0)
        text = self._stderr.read()
        self._stderr.close()
        return text

    def stop(self) -> None:
        if self.proc is not None:
            self._stop_and_read_stderr()
            self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def rnnzoo_server(model_dir: Path, max_batch: int, max_delay_ms: float) -> ServerProcess:
    """The real server through the real CLI (`rnnzoo serve`), quiet logs, no TTL sweeps."""
    cmd = [
        sys.executable,
        "-m",
        "rnnzoo.cli",
        "serve",
        "--model-dir",
        str(model_dir),
        "--port",
        "0",
        "--max-batch",
        str(max_batch),
        "--max-delay-ms",
        str(max_delay_ms),
        "--log-level",
        "warning",
        "--session-ttl",
        "0",
    ]
    return ServerProcess(cmd, f"rnnzoo(max_batch={max_batch}, max_delay_ms={max_delay_ms})")


def echo_server(output_name: str, output_features: int) -> ServerProcess:
    cmd = [
        sys.executable,
        "-m",
        "rnnzoo.benchmarks.echo_server",
        "--port",
        "0",
        "--output-name",
        output_name,
        "--output-features",
        str(output_features),
    ]
    return ServerProcess(cmd, "echo")


def minimal_server(onnx_path: Path) -> ServerProcess:
    """The floor under the lean path: decode, one ORT call, encode (``minimal_server.py``)."""
    cmd = [
        sys.executable,
        "-m",
        "rnnzoo.benchmarks.minimal_server",
        "--port",
        "0",
        "--model",
        str(onnx_path),
    ]
    return ServerProcess(cmd, "minimal (decode, ORT, encode)")
