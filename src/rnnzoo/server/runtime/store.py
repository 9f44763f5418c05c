"""Durable session state: one small interface, an embedded store and Redis.

``rnnzoo serve --state-store DIR`` (``SqliteStore``: one SQLite file in WAL mode under DIR,
safe for several processes on one host) or ``--state-store redis://[:password@]host:port/db``
(``rediss://`` for TLS; ``RedisStore``, redis-py asyncio). Without one, sessions live in the
process's memory only (as before): a restart loses them.

What is stored per session (the ``Record``): its ``Snapshot`` bytes (snapshot.py), its lease
(``holder``, ``epoch``, expiry: lease.py's fields) and its last response with the position it
answered (position-based deduplication of retried chunks).

Every state write is *fenced*: it carries the lease epoch its writer holds, and the store
applies it only if the stored epoch is still that one, checked in the same round trip as the
write (SQLite: ``UPDATE ... WHERE epoch=?`` in one transaction; Redis: a Lua script). A paused
old owner whose lease moved on therefore cannot overwrite newer state. A write from outside a
stream (``leased=False``: Infer(advance), ResetSession) also fails while a live lease is held.

``GroupWriter`` coalesces the writes of the sessions one batch answered into one store call:
with Redis one pipelined round trip per batch, with SQLite one transaction.

Leases use the store's clock (Redis: ``TIME``; SQLite: this host's wall clock), so processes
agree on when a lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from rnnzoo.errors import InvalidArgument, Unavailable

DEFAULT_MAX_TTL_S = 7 * 86400.0  # a session without an idle TTL still expires from the store


@dataclass(slots=True)
class Record:
    sid: str
    snap: bytes
    epoch: int
    holder: str  # "" when no lease is held
    lease_left_s: float  # seconds until the lease runs out (<= 0: free)
    resp: bytes | None  # the last response (deduplication), None before the first
    rpos: int  # the position that response answered (steps before its chunk); -1: none


@dataclass(slots=True)
class Write:
    sid: str
    epoch: int  # the fencing token the writer holds (the epoch it read or its lease's)
    snap: bytes
    ttl_s: float  # the key's expiry in the store, refreshed by every write
    resp: bytes | None = None
    rpos: int = -1
    leased: bool = True  # False: also refused while another live lease is held
    create: bool = False  # a new session: refused if the id exists
    # create only: the caller's key and its max_sessions_per_client (0: no quota). The store
    # counts the key's live sessions across every process and refuses the create at the
    # limit, in the same round trip (the result is then None).
    quota_key: str | None = None
    quota_max: int = 0


@dataclass(slots=True)
class Acquired:
    ok: bool
    epoch: int = 0
    held_for_s: float = 0.0  # not ok: seconds until the current holder's lease runs out
    record: Record | None = None  # ok: the session as stored (None: no such session)


class StateStore(ABC):
    """Where sessions outlive the process. All methods are coroutines; a store that cannot
    be reached raises Unavailable saying so."""

    url: str  # for messages, without a password
    round_trips = 0  # store calls made (tests check writes are grouped per batch)

    @abstractmethod
    async def write(self, writes: list[Write], lease_ttl_s: float) -> list[bool | None]:
        """Apply fenced writes in one round trip; one result each: True applied, False
        fenced off (or, for a create, the id exists), None a create over its quota."""

    @abstractmethod
    async def take_tokens(self, key: str, want: int, rate: float, burst: float) -> int:
        """The shared token bucket ``key`` (refilled at ``rate``/s, at most ``burst``):
        take up to ``want`` whole tokens; returns how many it gave (0 when empty)."""

    @abstractmethod
    async def load(self, sid: str) -> Record | None: ...

    @abstractmethod
    async def delete(self, sid: str) -> None: ...

    @abstractmethod
    async def acquire(self, sid: str, holder: str, ttl_s: float) -> Acquired:
        """Take the session's lease (epoch + 1) unless another holder's is alive."""

    @abstractmethod
    async def renew(self, leases: list[tuple[str, str, int]], ttl_s: float) -> list[bool]:
        """(sid, holder, epoch) leases -> renewed? (False: it moved on), one round trip."""

    @abstractmethod
    async def release(self, sid: str, holder: str, epoch: int) -> None: ...

    @abstractmethod
    async def release_holders(self, prefix: str) -> int:
        """Free every lease whose holder id starts with ``prefix`` (a dead process's tag,
        lease.process_tag); returns how many. Only for holders known to be dead: their
        epochs stay, and the next acquire bumps them as after an expiry."""

    async def close(self) -> None:
        return None


def open_store(spec: str | None, max_ttl_s: float = DEFAULT_MAX_TTL_S) -> StateStore | None:
    """``--state-store``: None/"" -> no store; redis:// or rediss:// URL -> Redis; else a
    directory for the embedded store."""
    if not spec:
        return None
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec, max_ttl_s)
    if "://" in spec:
        raise InvalidArgument(
            f"--state-store {spec.split('://')[0]}://... is not supported; give a directory "
            "(embedded SQLite store) or a redis:// / rediss:// URL"
        )
    return SqliteStore(spec, max_ttl_s)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# ---- the embedded store: SQLite in WAL mode ------------------------------------------------
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


# ---- Redis ------------------------------------------------------------------------------------
_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

_WRITE = """
if ARGV[7] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  local qmax = tonumber(ARGV[9])
  if qmax > 0 then
    local live = 0
    for _, sid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
      if redis.call('EXISTS', ARGV[10] .. sid) == 1 then live = live + 1
      else redis.call('SREM', KEYS[2], sid) end
    end
    if live >= qmax then return -1 end
    redis.call('SADD', KEYS[2], ARGV[11])
    redis.call('PEXPIRE', KEYS[2], ARGV[12])
  end
  redis.call('HSET', KEYS[1], 'snap', ARGV[2], 'epoch', 0, 'holder', '', 'lexp', 0,
             'resp', '', 'rpos', -1)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
local v = redis.call('HMGET', KEYS[1], 'epoch', 'holder', 'lexp')
if not v[1] or v[1] ~= ARGV[1] then return 0 end
if ARGV[6] == '0' and v[2] ~= '' and tonumber(v[3]) > now then return 0 end
redis.call('HSET', KEYS[1], 'snap', ARGV[2], 'resp', ARGV[3], 'rpos', ARGV[4])
if ARGV[6] == '1' and v[2] ~= '' then
  redis.call('HSET', KEYS[1], 'lexp', now + tonumber(ARGV[8]))
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

_LOAD = """
local v = redis.call('HMGET', KEYS[1], 'snap', 'epoch', 'holder', 'lexp', 'resp', 'rpos')
if not v[1] then return false end
return {v[1], v[2], v[3], tostring(tonumber(v[4]) - now), v[5], v[6]}
"""

_ACQUIRE = """
local v = redis.call('HMGET', KEYS[1], 'snap', 'epoch', 'holder', 'lexp', 'resp', 'rpos')
if not v[1] then return {0} end
if v[3] ~= '' and v[3] ~= ARGV[1] and tonumber(v[4]) > now then
  return {-1, tonumber(v[4]) - now}
end
local e = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'lexp', now + tonumber(ARGV[2]))
local ttl = redis.call('PTTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, e, v[1], v[5], v[6]}
"""

_RENEW = """
local v = redis.call('HMGET', KEYS[1], 'epoch', 'holder', 'lexp')
if v[1] ~= ARGV[2] or v[2] ~= ARGV[1] or tonumber(v[3]) < now then return 0 end
redis.call('HSET', KEYS[1], 'lexp', now + tonumber(ARGV[3]))
return 1
"""

_TAKE = """
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens = burst
if v[1] then
  tokens = math.min(burst, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate / 1000)
end
local got = math.max(0, math.min(want, math.floor(tokens)))
tokens = tokens - got
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return got
"""

_RELEASE_HOLDERS = """
local n = 0
for i, key in ipairs(KEYS) do
  local h = redis.call('HGET', key, 'holder')
  if h and string.sub(h, 1, string.len(ARGV[1])) == ARGV[1] then
    redis.call('HSET', key, 'holder', '', 'lexp', 0)
    n = n + 1
  end
end
return n
"""

_RELEASE = """
local v = redis.call('HMGET', KEYS[1], 'epoch', 'holder')
if v[1] == ARGV[2] and v[2] == ARGV[1] then redis.call('HSET', KEYS[1], 'holder', '', 'lexp', 0) end
return 1
"""


class RedisStore(StateStore):
    """A Redis hash per session (``rnnzoo:s:<id>``) with a key TTL refreshed by every write
    (the session's idle TTL, at most ``max_ttl_s``), so Redis memory stays bounded. AUTH and
    TLS come from the URL (``redis://:password@host:port/db``, ``rediss://``). Every call is
    one round trip (scripts pipelined); an unreachable Redis raises Unavailable.

    Shared quotas: a set per session-quota key (``rnnzoo:q:<key>``) holds the ids of its
    sessions; a create counts the members whose session still exists (dropping the rest) and
    refuses at the limit, in the same script as the create. The set expires ``max_ttl_s``
    after the key's last create. A hash per rate key (``rnnzoo:r:<key>``) is its token
    bucket, expiring once it would be full again. The create script reads session keys it
    does not declare: one Redis (or a primary with replicas), not Redis Cluster."""

    PREFIX = "rnnzoo:s:"
    QUOTA_PREFIX = "rnnzoo:q:"  # a set per quota key: the ids of its sessions
    RATE_PREFIX = "rnnzoo:r:"  # a hash per rate key: its token bucket

    def __init__(self, url: str, max_ttl_s: float = DEFAULT_MAX_TTL_S):
        try:
            import redis.asyncio as aioredis
        except ImportError:  # pragma: no cover - a dependency
            raise InvalidArgument("--state-store redis://... needs the 'redis' package") from None
        self.url = _redact(url)
        self.max_ttl_s = max_ttl_s
        self._client = aioredis.from_url(
            url, socket_connect_timeout=5.0, socket_timeout=10.0, decode_responses=False
        )
        self._scripts = {
            name: self._client.register_script(
                src if name in ("release", "release_holders") else _NOW + src
            )
            for name, src in (
                ("write", _WRITE),
                ("load", _LOAD),
                ("acquire", _ACQUIRE),
                ("renew", _RENEW),
                ("release", _RELEASE),
                ("take", _TAKE),
                ("release_holders", _RELEASE_HOLDERS),
            )
        }

    def _key(self, sid: str) -> str:
        return self.PREFIX + sid

    @contextlib.asynccontextmanager
    async def _guard(self):
        import redis.exceptions as rex

        self.round_trips += 1
        try:
            yield
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise Unavailable(
                f"the state store {self.url} is unreachable ({type(exc).__name__}: "
                f"{str(exc)[:200]}); sessions cannot be read or written until it is back, retry"
            ) from None
        except rex.ResponseError as exc:  # e.g. NOAUTH, a read-only replica
            if "NOSCRIPT" in str(exc):
                self._loaded = False  # Redis restarted: load the scripts again next call
            raise Unavailable(f"the state store {self.url} refused ({str(exc)[:200]})") from None

    async def _pipeline(self, name: str, calls: list[tuple[list, list]]) -> list:
        script = self._scripts[name]
        async with self._guard():
            # load the scripts once (EVALSHA in a pipeline cannot recover from NOSCRIPT)
            if not getattr(self, "_loaded", False):
                for s in self._scripts.values():
                    s.sha = await self._client.script_load(s.script)
                self._loaded = True
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return await pipe.execute()

    async def write(self, writes: list[Write], lease_ttl_s: float) -> list[bool | None]:
        calls = []
        for w in writes:
            ttl_ms = int(1000 * min(w.ttl_s, self.max_ttl_s))
            keys = [self._key(w.sid)]
            args = [
                w.epoch,
                w.snap,
                w.resp or b"",
                w.rpos,
                max(ttl_ms, 1),
                int(w.leased),
                int(w.create),
                int(lease_ttl_s * 1000),
            ]
            if w.create:  # the quota's arguments: only a create reads them (not every step)
                quota = w.quota_max > 0 and w.quota_key is not None
                keys.append(self.QUOTA_PREFIX + w.quota_key if quota else keys[0])
                args += [
                    w.quota_max if quota else 0,
                    self.PREFIX,
                    w.sid,
                    int(1000 * self.max_ttl_s),
                ]
            calls.append((keys, args))
        return [None if r == -1 else bool(r) for r in await self._pipeline("write", calls)]

    async def take_tokens(self, key: str, want: int, rate: float, burst: float) -> int:
        (got,) = await self._pipeline("take", [([self.RATE_PREFIX + key], [rate, burst, want])])
        return int(got)

    async def load(self, sid: str) -> Record | None:
        (v,) = await self._pipeline("load", [([self._key(sid)], [])])
        if not v:
            return None
        snap, epoch, holder, left, resp, rpos = v
        holder = holder.decode()
        return Record(
            sid,
            snap,
            int(epoch),
            holder,
            float(left) / 1000 if holder else 0.0,
            resp or None,
            int(rpos),
        )

    async def delete(self, sid: str) -> None:
        async with self._guard():
            await self._client.delete(self._key(sid))

    async def acquire(self, sid: str, holder: str, ttl_s: float) -> Acquired:
        (v,) = await self._pipeline("acquire", [([self._key(sid)], [holder, int(ttl_s * 1000)])])
        if v[0] == 0:
            return Acquired(True)
        if v[0] == -1:
            return Acquired(False, 0, float(v[1]) / 1000)
        _, epoch, snap, resp, rpos = v
        rec = Record(sid, snap, int(epoch), holder, ttl_s, resp or None, int(rpos))
        return Acquired(True, int(epoch), 0.0, rec)

    async def renew(self, leases: list[tuple[str, str, int]], ttl_s: float) -> list[bool]:
        calls = [([self._key(s)], [h, e, int(ttl_s * 1000)]) for s, h, e in leases]
        return [bool(r) for r in await self._pipeline("renew", calls)]

    async def release(self, sid: str, holder: str, epoch: int) -> None:
        await self._pipeline("release", [([self._key(sid)], [holder, epoch])])

    async def release_holders(self, prefix: str) -> int:
        # SCAN in batches from here, one script per batch: never one long script over every
        # key (that would block Redis); runs only when a worker process has died
        n = 0
        async with self._guard():
            keys = [k async for k in self._client.scan_iter(match=self.PREFIX + "*", count=1000)]
        for i in range(0, len(keys), 500):
            (got,) = await self._pipeline("release_holders", [(keys[i : i + 500], [prefix])])
            n += int(got)
        return n

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.aclose()


class GroupWriter:
    """Coalesce writes: every write enqueued while the previous store call runs (or in the
    same event-loop turn, e.g. the sessions one batch answered) goes in one store call."""

    def __init__(self, store: StateStore, lease_ttl_s: float) -> None:
        self.store, self.lease_ttl_s = store, lease_ttl_s
        self._pending: list[tuple[Write, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self._scheduled = False

    async def write(self, w: Write) -> bool | None:
        """The write's result (see ``StateStore.write``)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((w, fut))
        if not self._scheduled and (self._task is None or self._task.done()):
            self._scheduled = True
            loop.call_soon(self._kick)  # after the other sessions the same batch woke
        return await fut

    def _kick(self) -> None:
        self._scheduled = False
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                oks = await self.store.write([w for w, _ in batch], self.lease_ttl_s)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), ok in zip(batch, oks, strict=True):
                if not fut.done():
                    fut.set_result(ok)
