"""Streaming load under faults, for tests/test_faults_*.py (issue 21).

``Load`` streams N sessions of one model through the Python client, one thread each, in
chunks of 1-3 steps, until every session has sent its whole sequence or the deadline. Most
sessions send positions (``Session.step``'s default); ``positionless`` of them do not. On an
error a session does exactly what the message says: resend from the position it names,
start a new session when the store lost its own, resend otherwise (for positionless
sessions too, after the server has said where the session stands). Every acknowledged
output is compared with the whole sequence run offline (a stateless Infer of the whole
sequence, computed before any fault): ``wrong`` counts acknowledged outputs that differ, and
every error message is kept for the tests to judge.

``HealthWatch`` polls grpc health every 50 ms and keeps the transitions with their times.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnzoo.client import Client, RpcError

EXACT = 1e-5
POSITION_RE = re.compile(r"position[= ](\d+)")


@dataclass
class Stream:
    """One client session's run: what it was told, and what it got."""

    x: np.ndarray
    ref: np.ndarray
    positions: bool
    at: int = 0  # steps acknowledged (the client's position)
    acked: int = 0  # outputs acknowledged and checked
    wrong: list[str] = field(default_factory=list)
    errors: list[tuple[float, str, str]] = field(default_factory=list)  # (t, code, message)
    restarts: int = 0  # new sessions after the store lost one
    ids: list[str] = field(default_factory=list)  # every session id it used
    last_ok: float = 0.0
    ok_at: list[float] = field(default_factory=list)  # when each acknowledgement came

    def first_ok_after(self, t: float) -> float | None:
        return next((x for x in self.ok_at if x >= t), None)


class Load:
    def __init__(
        self,
        target: str,
        model: str = "gru",
        sessions: int = 12,
        positionless: int = 4,
        steps: int = 300,
        seed: int = 0,
        step_timeout: float = 3.0,
        pause_s: float = 0.01,
    ) -> None:
        self.target, self.model = target, model
        self.pause_s = pause_s
        self.step_timeout = step_timeout
        rng = np.random.default_rng(seed)
        with Client(target, timeout=20) as c:
            xs = [rng.normal(size=(steps, 3)).astype(np.float32) for _ in range(sessions)]
            refs = [c.infer(model, x[None])["y"][0] for x in xs]
        self.streams = [
            Stream(x, ref, positions=i >= positionless)
            for i, (x, ref) in enumerate(zip(xs, refs, strict=True))
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.t0 = time.monotonic()

    def start(self) -> None:
        self.t0 = time.monotonic()
        for i, s in enumerate(self.streams):
            t = threading.Thread(target=self._run, args=(s, i), daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        for t in self._threads:
            t.join(10)

    @property
    def done(self) -> bool:
        return all(s.at >= len(s.x) for s in self.streams)

    def stuck(self) -> str:
        """The sessions that did not finish, with what they were told (for a failing test)."""
        lines = []
        for s in self.streams:
            if s.at < len(s.x):
                lines.append(f"at {s.at}/{len(s.x)} positions={s.positions}:")
                lines += [f"  {t:.2f} {c} {m[:80]} ... {m[-100:]}" for t, c, m in s.errors[:10]]
                lines += [f"  {t:.2f} {c} {m[:80]} ... {m[-100:]}" for t, c, m in s.errors[-3:]]
        return "\n".join(lines)

    def session_ids(self) -> list[str]:
        return [i for s in self.streams for i in s.ids]

    def wrong(self) -> list[str]:
        return [w for s in self.streams for w in s.wrong]

    def errors(self) -> list[tuple[float, str, str]]:
        return sorted(e for s in self.streams for e in s.errors)

    # ---- one session ----------------------------------------------------------------------
    def _new(self, c: Client, s: Stream):
        sess = c.session(self.model)
        s.ids.append(sess.id)
        if not s.positions:
            sess.position = None  # sends no positions
        s.at = 0
        return sess

    def _run(self, s: Stream, i: int) -> None:
        rng = np.random.default_rng(1000 + i)
        c = Client(self.target, timeout=5, retry_s=0.0, step_timeout=self.step_timeout)
        sess = None
        n = 0  # the chunk in flight: resent as it was until one is acknowledged
        try:
            while not self._stop.is_set() and s.at < len(s.x):
                try:
                    if sess is None:
                        sess = self._new(c, s)
                    if n == 0:
                        n = int(rng.integers(1, 4))
                    n = min(n, len(s.x) - s.at)
                    if s.positions:
                        sess.position = s.at
                    out = sess.step(s.x[s.at : s.at + n])
                except RpcError as err:
                    if not self._follow(s, err, c, sess):
                        sess = None
                    time.sleep(0.05)
                    continue
                except Exception as exc:  # e.g. the channel closed as the test ends
                    s.errors.append((time.monotonic() - self.t0, type(exc).__name__, str(exc)))
                    time.sleep(0.05)
                    continue
                y, want = out.value, s.ref[s.at : s.at + n]
                if out.start != s.at or y.shape != want.shape:
                    s.wrong.append(
                        f"session {sess.id[:6]}: sent {n} steps at {s.at}, answered "
                        f"{len(y)} steps at {out.start}"
                    )
                elif not np.allclose(y, want, atol=EXACT, rtol=0):
                    err = float(np.max(np.abs(y - want)))
                    s.wrong.append(f"session {sess.id[:6]} at {s.at}: max error {err:.3g}")
                s.at += n
                s.acked += n
                n = 0
                s.last_ok = time.monotonic() - self.t0
                s.ok_at.append(s.last_ok)
                time.sleep(self.pause_s)
        finally:
            c.close()

    def _follow(self, s: Stream, err: RpcError, c: Client, sess) -> bool:
        """Do what the error says; False: the session is gone (start a new one)."""
        msg, code = err.details() or "", err.code().name
        s.errors.append((time.monotonic() - self.t0, code, msg))
        if "no longer has this session" in msg or code == "NOT_FOUND":
            s.restarts += 1
            return False
        m = POSITION_RE.findall(msg)
        if m and code in ("ABORTED", "FAILED_PRECONDITION"):
            # "continue from position N" / "resend ... from position N": the last one named
            s.at = min(int(m[-1]), len(s.x))
        return sess is not None


class HealthWatch:
    """grpc health of ``target`` polled every 50 ms; ``changes``: (t, status) transitions,
    ``t`` on ``time.monotonic()``."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.changes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def status(self) -> str:
        try:
            r = self.stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as err:
            return f"error:{err.code().name}"

    def _run(self) -> None:
        last = None
        while not self._stop.is_set():
            st = self.status()
            if st != last:
                self.changes.append((time.monotonic(), st))
                last = st
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.channel.close()

    def since(self, t0: float) -> list[tuple[float, str]]:
        """The transitions with times relative to ``t0`` (e.g. a Load's)."""
        return [(t - t0, s) for t, s in self.changes]

    def wait_for(self, status: str, timeout: float) -> str:
        """Poll until health says ``status`` (the probe runs every second); the last seen."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st == status or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def saw(self, status: str) -> bool:
        return any(s == status for _, s in self.changes)

    def last(self) -> str:
        return self.changes[-1][1] if self.changes else ""
