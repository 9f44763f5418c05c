"""Real processes for the durable-session tests: rnnzoo serve, redis-server and nginx on free
loopback ports, each with its own files under a temp dir, stopped by PID."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RNNZOO = [sys.executable, "-m", "rnnzoo.cli"]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc=None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited: {log.read_text()[-2000:] if log else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Proc:
    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.fh = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(args, stdout=self.fh, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.p.pid

    def kill9(self) -> None:
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(10)

    def term(self, timeout: float = 20.0) -> int:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return -9

    def stop(self) -> None:
        if self.p.poll() is None:
            self.term(10)
        self.fh.close()


class Serve(Proc):
    def __init__(self, zoo: Path, store: str | None, tmp: Path, *extra: str, port: int = 0):
        self.port = port or free_port()
        args = [
            *RNNZOO,
            "serve",
            "--model-dir",
            str(zoo),
            "--port",
            str(self.port),
            "--session-ttl",
            "0",
            "--grace",
            "1",
            *extra,
        ]
        if store:
            args += ["--state-store", store]
        super().__init__(args, tmp / f"serve-{self.port}.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if re.search(rb"listening on", self.log.read_bytes()):
                return
            if self.p.poll() is not None:
                raise RuntimeError(f"rnnzoo serve exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError("rnnzoo serve did not start")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class Redis(Proc):
    def __init__(self, tmp: Path, password: str | None = None):
        self.port = free_port()
        d = tmp / f"redis-{self.port}"
        d.mkdir()
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
            "--pidfile",
            str(d / "redis.pid"),
            "--daemonize",
            "no",
        ]
        if password:
            args += ["--requirepass", password]
        self.password = password
        super().__init__(args, d / "redis.log")
        wait_port(self.port)

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"


class Nginx(Proc):
    def __init__(
        self,
        tmp: Path,
        upstreams: list[int],
        server_opts: str = "max_fails=0",
        edits: dict[str, str] | None = None,
    ):
        """``server_opts``: each upstream server line's options; ``edits``: text of the
        template replaced (e.g. a shorter grpc_read_timeout for a test)."""
        self.port = free_port()
        prefix = tmp / f"nginx-{self.port}"
        prefix.mkdir()
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir()
        os.chmod(prefix, 0o755)
        text = (ROOT / "deploy" / "nginx-rnnzoo.conf.template").read_text()
        for a, b in (edits or {}).items():
            assert a in text, a
            text = text.replace(a, b)
        servers = "\n        ".join(f"server 127.0.0.1:{p} {server_opts};" for p in upstreams)
        text = (
            text.replace("@PREFIX@", str(prefix))
            .replace("@LISTEN@", f"127.0.0.1:{self.port}")
            .replace("@SERVERS@", servers)
        )
        conf = prefix / "nginx.conf"
        conf.write_text(text)
        args = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
        super().__init__(args, prefix / "stdout.log")
        wait_port(self.port, proc=self.p, log=prefix / "error.log")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"
