"""The embedded store: one SQLite file in WAL mode (``--state-store DIR``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path

from rnnzoo.errors import InvalidArgument, Unavailable

from .api import DEFAULT_MAX_TTL_S, Acquired, Record, StateStore, Write

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY,
    snap BLOB NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    holder TEXT NOT NULL DEFAULT '',
    lexp REAL NOT NULL DEFAULT 0,
    resp BLOB,
    rpos INTEGER NOT NULL DEFAULT -1,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS buckets (
    key TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    at REAL NOT NULL,
    full_at REAL NOT NULL
)
"""


class SqliteStore(StateStore):
    """DIR/sessions.sqlite3, WAL mode, files 0600 in a 0700 directory. Several processes on
    one host may share it (SQLite's locking; busy timeout 10 s). A committed transaction is
    in the WAL file before the response goes out, so ``kill -9`` of a server loses no
    acknowledged step; ``synchronous=NORMAL`` means an OS crash or power loss can lose the
    transactions since the last WAL sync (checkpoint)."""

    SWEEP_EVERY_S = 30.0

    def __init__(self, directory: str | os.PathLike, max_ttl_s: float = DEFAULT_MAX_TTL_S):
        self.dir = Path(directory)
        self.path = self.dir / "sessions.sqlite3"
        self.url = str(self.path)
        self.max_ttl_s = max_ttl_s
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)  # before SQLite makes it
            os.close(fd)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot create the state store {self.path}: {exc.strerror}; pick another "
                "--state-store directory"
            ) from None
        self._local = threading.local()
        self._lock = threading.Lock()  # one writer thread at a time within this process
        self._last_sweep = 0.0
        conn = self._conn()
        conn.executescript(_SCHEMA)
        # a store made before session quotas were shared: add their column
        if "qkey" not in {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}:
            with contextlib.suppress(sqlite3.OperationalError):  # another process added it
                conn.execute("ALTER TABLE sessions ADD COLUMN qkey TEXT")
        conn.execute("CREATE INDEX IF NOT EXISTS sessions_qkey ON sessions (qkey)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            old = os.umask(0o077)  # -wal and -shm files: owner only
            try:
                conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            finally:
                os.umask(old)
            self._local.conn = conn
        return conn

    async def _run(self, fn, *args):
        self.round_trips += 1
        try:
            return await asyncio.to_thread(self._locked, fn, *args)
        except sqlite3.Error as exc:
            raise Unavailable(f"the state store {self.path} failed ({exc}); retry") from None

    def _locked(self, fn, *args):
        with self._lock:
            return fn(self._conn(), *args)

    async def write(self, writes: list[Write], lease_ttl_s: float) -> list[bool]:
        return await self._run(self._write, writes, lease_ttl_s)

    def _write(self, conn: sqlite3.Connection, writes: list[Write], lease_ttl_s: float):
        now = time.time()
        out: list[bool | None] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for w in writes:
                expires = now + min(w.ttl_s, self.max_ttl_s)
                if w.create:
                    if w.quota_max > 0 and w.quota_key is not None:
                        (live,) = conn.execute(
                            "SELECT COUNT(*) FROM sessions WHERE qkey=? AND expires>=?",
                            (w.quota_key, now),
                        ).fetchone()
                        if live >= w.quota_max:
                            out.append(None)
                            continue
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO sessions (sid, snap, expires, qkey) "
                        "VALUES (?, ?, ?, ?)",
                        (w.sid, w.snap, expires, w.quota_key),
                    )
                elif w.leased:
                    cur = conn.execute(
                        "UPDATE sessions SET snap=?, resp=?, rpos=?, expires=?, "
                        "lexp=CASE WHEN holder<>'' THEN ? ELSE lexp END "
                        "WHERE sid=? AND epoch=?",
                        (w.snap, w.resp, w.rpos, expires, now + lease_ttl_s, w.sid, w.epoch),
                    )
                else:
                    cur = conn.execute(
                        "UPDATE sessions SET snap=?, resp=?, rpos=?, expires=? "
                        "WHERE sid=? AND epoch=? AND (holder='' OR lexp<?)",
                        (w.snap, w.resp, w.rpos, expires, w.sid, w.epoch, now),
                    )
                out.append(cur.rowcount == 1)
            if now - self._last_sweep > self.SWEEP_EVERY_S:
                self._last_sweep = now
                conn.execute("DELETE FROM sessions WHERE expires < ?", (now,))
                conn.execute("DELETE FROM buckets WHERE full_at < ?", (now,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    async def take_tokens(self, key: str, want: int, rate: float, burst: float) -> int:
        return await self._run(self._take_tokens, key, want, rate, burst)

    def _take_tokens(
        self, conn: sqlite3.Connection, key: str, want: int, rate: float, burst: float
    ) -> int:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT tokens, at FROM buckets WHERE key=?", (key,)).fetchone()
            tokens = burst if row is None else min(burst, row[0] + max(0.0, now - row[1]) * rate)
            got = max(0, min(want, int(tokens)))
            tokens -= got
            conn.execute(
                "INSERT OR REPLACE INTO buckets (key, tokens, at, full_at) VALUES (?, ?, ?, ?)",
                (key, tokens, now, now + (burst - tokens) / rate),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return got

    async def load(self, sid: str) -> Record | None:
        return await self._run(self._load, sid)

    def _load(self, conn: sqlite3.Connection, sid: str) -> Record | None:
        now = time.time()
        row = conn.execute(
            "SELECT snap, epoch, holder, lexp, resp, rpos FROM sessions WHERE sid=? AND expires>=?",
            (sid, now),
        ).fetchone()
        if row is None:
            return None
        snap, epoch, holder, lexp, resp, rpos = row
        return Record(sid, snap, epoch, holder, lexp - now if holder else 0.0, resp, rpos)

    async def delete(self, sid: str) -> None:
        await self._run(lambda c, s: c.execute("DELETE FROM sessions WHERE sid=?", (s,)), sid)

    async def acquire(self, sid: str, holder: str, ttl_s: float) -> Acquired:
        return await self._run(self._acquire, sid, holder, ttl_s)

    def _acquire(self, conn: sqlite3.Connection, sid: str, holder: str, ttl_s: float):
        conn.execute("BEGIN IMMEDIATE")
        try:
            rec = self._load(conn, sid)
            if rec is None:
                conn.execute("COMMIT")
                return Acquired(True)
            if rec.holder and rec.holder != holder and rec.lease_left_s > 0:
                conn.execute("COMMIT")
                return Acquired(False, rec.epoch, rec.lease_left_s)
            now = time.time()
            conn.execute(
                "UPDATE sessions SET epoch=epoch+1, holder=?, lexp=?, "
                "expires=MAX(expires, ?) WHERE sid=?",
                (holder, now + ttl_s, now + ttl_s, sid),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        rec.epoch, rec.holder, rec.lease_left_s = rec.epoch + 1, holder, ttl_s
        return Acquired(True, rec.epoch, 0.0, rec)

    async def renew(self, leases: list[tuple[str, str, int]], ttl_s: float) -> list[bool]:
        return await self._run(self._renew, leases, ttl_s)

    def _renew(self, conn: sqlite3.Connection, leases, ttl_s: float) -> list[bool]:
        now = time.time()
        out = []
        conn.execute("BEGIN IMMEDIATE")
        for sid, holder, epoch in leases:
            cur = conn.execute(
                "UPDATE sessions SET lexp=? WHERE sid=? AND holder=? AND epoch=? AND lexp>=?",
                (now + ttl_s, sid, holder, epoch, now),
            )
            out.append(cur.rowcount == 1)
        conn.execute("COMMIT")
        return out

    async def release_holders(self, prefix: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE sessions SET holder='', lexp=0 WHERE substr(holder, 1, ?) = ?",
                (len(prefix), prefix),
            )
            return cur.rowcount

        return await self._run(run)

    async def release(self, sid: str, holder: str, epoch: int) -> None:
        await self._run(
            lambda c: c.execute(
                "UPDATE sessions SET holder='', lexp=0 WHERE sid=? AND holder=? AND epoch=?",
                (sid, holder, epoch),
            )
        )
