"""Redis (``--state-store redis://...`` or ``rediss://``): a hash per session, Lua scripts."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

from rnnzoo.errors import InvalidArgument, StoreOutcomeUnknown, StoreUnavailable

from ..redact import scrub
from . import wire
from .api import DEFAULT_MAX_TTL_S, Acquired, Record, StateStore, Write, redact

Call = tuple[Sequence[wire.Arg], Sequence[wire.Arg]]  # one script call's (keys, args)
_ONE, _ZERO = b"$1\r\n1\r\n", b"$1\r\n0\r\n"  # packed flags (wire.bulk_int)

_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

# A session's snapshot is kept in two fields: ``snap`` and ``tail``, the snapshot's last bytes
# when they are its initial state (``Write.tail``), which never change for a session: a step
# sends only ``snap`` (its tail's length, and an empty tail) and the tail stays. A record is
# ``snap .. tail``; one written whole (``tail`` empty or absent: by a write with no tail, or
# by a version before this) is read as it is. A step write whose tail is not the stored
# one's length (an older record) changes nothing and returns -4: the writer sends it again
# with its tail (``RedisStore.write``).
_STEP = """
local function step(key, epoch, snap, resp, rpos, ttl, leased, lease_ms, steps, n, tail)
  local v = redis.call('HMGET', key, 'epoch', 'holder', 'lexp', 'steps')
  if not v[1] then return -2 end
  if v[1] ~= epoch then return 0 end
  if leased == '0' and v[2] ~= '' and tonumber(v[3]) > now then return 0 end
  if tonumber(rpos) >= 0 and v[4] and v[4] ~= '-1' and v[4] ~= rpos then return -3 end
  if n > 0 and tail == '' and redis.call('HSTRLEN', key, 'tail') ~= n then return -4 end
  -- one HSET: each call costs redis-server ~1 us
  local f = {'snap', snap, 'resp', resp, 'rpos', rpos, 'steps', steps}
  if leased == '1' and v[2] ~= '' then f[9] = 'lexp' f[10] = now + lease_ms end
  if n == 0 or tail ~= '' then f[#f + 1] = 'tail' f[#f + 1] = tail end
  redis.call('HSET', key, unpack(f))
  redis.call('PEXPIRE', key, ttl)
  return 1
end
"""

# one write (a create: its quota too), as RedisStore.write_calls makes it
_WRITE = (
    _STEP
    + """
local n = tonumber(ARGV[10])
if ARGV[7] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  local qmax = tonumber(ARGV[12])
  if qmax > 0 then
    local live = 0
    for _, sid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
      if redis.call('EXISTS', ARGV[13] .. sid) == 1 then live = live + 1
      else redis.call('SREM', KEYS[2], sid) end
    end
    if live >= qmax then return -1 end
    redis.call('SADD', KEYS[2], ARGV[14])
    redis.call('PEXPIRE', KEYS[2], ARGV[15])
  end
  redis.call('HSET', KEYS[1], 'snap', ARGV[2], 'tail', ARGV[11], 'epoch', 0, 'holder', '',
             'lexp', 0, 'resp', '', 'rpos', -1, 'steps', ARGV[9])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
return step(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[8]),
            ARGV[9], n, ARGV[11])
"""
)

# the step writes of a batch in one call (RedisStore.steps_call): KEYS the sessions' keys,
# ARGV[1] the lease's ms, then 9 per write; one result each. One call instead of one per
# write: Redis answered a batch of 64 separate calls in ~8 pieces as it read them (16 KB a
# read), and each piece woke the server's event loop (cProfile: 5517 loop turns for 300
# batches of 2.6 KB writes, 1934 of 300-byte ones); one call is one reply
_STEPS = (
    _STEP
    + """
local lease_ms = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local a = 2 + (i - 1) * 9
  out[i] = step(key, ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5],
                lease_ms, ARGV[a + 6], tonumber(ARGV[a + 7]), ARGV[a + 8])
end
return out
"""
)

_FIELDS = "'snap', 'epoch', 'holder', 'lexp', 'resp', 'rpos', 'steps', 'tail'"

_LOAD = f"""
local v = redis.call('HMGET', KEYS[1], {_FIELDS})
if not v[1] then return false end
return {{v[1] .. (v[8] or ''), v[2], v[3], tostring(tonumber(v[4]) - now), v[5], v[6],
        v[7] or '-1'}}
"""

_ACQUIRE = f"""
local v = redis.call('HMGET', KEYS[1], {_FIELDS})
if not v[1] then return {{0}} end
if v[3] ~= '' and v[3] ~= ARGV[1] and tonumber(v[4]) > now then
  return {{-1, tonumber(v[4]) - now}}
end
local e = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'lexp', now + tonumber(ARGV[2]))
local ttl = redis.call('PTTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {{1, e, v[1] .. (v[8] or ''), v[5], v[6], v[7] or '-1'}}
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
    TLS come from the URL (``redis://:password@host:port/db``, ``rediss://``); so do the
    timeouts (``?socket_timeout=5&socket_connect_timeout=5``, the defaults). Every call is
    one round trip (scripts pipelined).

    Faults (issue 21), each measured in tests/test_faults_redis.py:

    - no hidden retries: redis-py retries a command 3 times on a timeout by default, so a
      state write that timed out was sent again and could land after the client was told it
      failed. Here a command is sent once;
    - a write whose answer did not come (a timeout, a connection lost after sending) raises
      ``StoreOutcomeUnknown``: the runtime answers ABORTED naming the position to resend
      from. Every write is a compare-and-set on the session's epoch *and* its position (the
      stored ``steps`` must equal the position the write's chunk started at), so a write
      that lands late, or twice, finds the position moved and changes nothing;
    - Redis unreachable: ``StoreUnavailable`` ("nothing was changed"); after a failed
      connection the next calls fail at once for a backoff (0.1 s doubling to 2 s) instead of
      each waiting out the connect timeout, and ``ping`` (the health probe) always tries;
    - scripts: loaded on first use and again whenever Redis answers NOSCRIPT (a restart, a
      failover, SCRIPT FLUSH), in pipelines too: only the calls that got NOSCRIPT (they did
      not run) are sent again;
    - error texts: Redis's own are scrubbed before they reach a message (redact.scrub: the
      NOSCRIPT text quoted the command with another client's full session id).

    Shared quotas: a set per session-quota key (``rnnzoo:q:<key>``) holds the ids of its
    sessions; a create counts the members whose session still exists (dropping the rest) and
    refuses at the limit, in the same script as the create. The set expires ``max_ttl_s``
    after the key's last create. A hash per rate key (``rnnzoo:r:<key>``) is its token
    bucket, expiring once it would be full again. The create script reads session keys it
    does not declare: one Redis (or a primary with replicas), not Redis Cluster."""

    PREFIX = "rnnzoo:s:"
    QUOTA_PREFIX = "rnnzoo:q:"  # a set per quota key: the ids of its sessions
    RATE_PREFIX = "rnnzoo:r:"  # a hash per rate key: its token bucket
    PROBE_KEY = "rnnzoo:probe"  # the health probe's write
    BACKOFF_S = (0.1, 2.0)  # after a failed connection: first wait, longest wait
    STEPS_PER_CALL = 128  # step writes a call of the steps script (Redis runs one ~1.5 ms)

    def __init__(self, url: str, max_ttl_s: float = DEFAULT_MAX_TTL_S):
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:  # pragma: no cover - a dependency
            raise InvalidArgument("--state-store redis://... needs the 'redis' package") from None
        self.url = redact(url)
        self.max_ttl_s = max_ttl_s
        self.round_trips = 0
        self._client = aioredis.from_url(  # the URL's own ?socket_timeout=... wins
            url,
            socket_connect_timeout=5.0,
            socket_timeout=5.0,
            decode_responses=False,
            retry=Retry(NoBackoff(), 0),  # sent once: see the class docstring
            **wire.driver_info(),
        )
        self._scripts = {
            name: self._client.register_script(
                src if name in ("release", "release_holders") else _NOW + src
            )
            for name, src in (
                ("write", _WRITE),
                ("steps", _STEPS),
                ("load", _LOAD),
                ("acquire", _ACQUIRE),
                ("renew", _RENEW),
                ("release", _RELEASE),
                ("take", _TAKE),
                ("release_holders", _RELEASE_HOLDERS),
            )
        }
        self._loaded = False
        self._retry_at = 0.0  # monotonic: no new connection attempt before this
        self._backoff = 0.0
        self._last_error = ""

    def _key(self, sid: str) -> str:
        return self.PREFIX + sid

    def _unreachable(self, why: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"the state store {self.url} is unreachable ({why}); nothing was changed by this "
            "request: sessions cannot be read or written until the store is back (this "
            "server reconnects by itself and reports NOT_SERVING until then); retry in a moment"
        )

    @contextlib.asynccontextmanager
    async def _guard(self, write: bool = False, probe: bool = False) -> AsyncIterator[None]:
        """One round trip: maps redis-py's errors to ours. ``write``: a state write, whose
        outcome is unknown when the connection fails after sending. ``probe``: the health
        probe, which tries even during the backoff."""
        import redis.exceptions as rex

        self.round_trips += 1
        now = time.monotonic()
        if not probe and now < self._retry_at:
            raise self._unreachable(
                f"{self._last_error}; reconnecting, next attempt in {self._retry_at - now:.1f} s"
            )
        try:
            yield
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            text = scrub(str(exc), 120)
            why = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            connecting = "connecting" in text.lower() or isinstance(exc, ConnectionRefusedError)
            if connecting:  # nothing was sent: back off before the next attempt
                self._backoff = min(max(self._backoff * 2, self.BACKOFF_S[0]), self.BACKOFF_S[1])
                self._retry_at = time.monotonic() + self._backoff
                self._last_error = why
            if write and not connecting:
                raise StoreOutcomeUnknown(
                    f"the state store {self.url} did not answer the write ({why})"
                ) from None
            raise self._unreachable(why) from None
        except rex.ResponseError as exc:  # e.g. NOAUTH, a read-only replica, OOM
            raise StoreUnavailable(
                f"the state store {self.url} refused ({scrub(str(exc))}); nothing was changed"
            ) from None
        self._backoff, self._retry_at = 0.0, 0.0

    async def _load_scripts(self) -> None:
        for s in self._scripts.values():
            s.sha = await self._client.script_load(s.script)
        self._loaded = True

    async def _pipeline(self, name: str, calls: list[Call], write: bool = False) -> list[Any]:
        """Script ``name``'s calls in one round trip; their results, in order."""
        sha = self._scripts[name].sha  # the script's SHA1, known without Redis (redis-py)
        # packed by us (wire.py: redis-py's Pipeline cost ~100 us per call to build)
        return await self._send([wire.evalsha(sha, *c) for c in calls], write)

    async def _send(self, packed: list[bytes], write: bool = False) -> list[Any]:
        """Packed EVALSHA commands of our scripts in one round trip; their results."""
        import redis.exceptions as rex

        async with self._guard(write):
            if not self._loaded:
                await self._load_scripts()
            out: list[Any] = [None] * len(packed)
            todo = list(range(len(packed)))
            for attempt in (0, 1):
                results = await wire.execute(self._client, [packed[i] for i in todo])
                again = []
                for i, r in zip(todo, results, strict=True):
                    if isinstance(r, rex.NoScriptError) and attempt == 0:
                        again.append(i)  # the script did not run: load it and send again
                    elif isinstance(r, Exception):
                        raise r
                    else:
                        out[i] = r
                if not again:
                    break
                await self._load_scripts()  # Redis restarted, failed over, or SCRIPT FLUSH
                todo = again
            return out

    async def ping(self) -> None:
        """The health probe (tried even while backing off): a small write that expires, so
        that a Redis which answers but refuses writes (a read-only replica after a failover,
        out of memory) is not healthy either; one round trip."""
        async with self._guard(probe=True):
            await self._client.set(self.PROBE_KEY, b"1", px=10_000)

    async def write(self, writes: list[Write], lease_ttl_s: float) -> list[bool | None]:
        results = await self._write(writes, lease_ttl_s, False)
        short = [i for i, r in enumerate(results) if r == -4]
        if short:  # stored whole (an older record): these did not run; again with their tails
            # (a fault now makes the whole batch's outcome unknown, the ones applied above
            # too: they are read back, as after any unknown outcome)
            again = await self._write([writes[i] for i in short], lease_ttl_s, True)
            for i, r in zip(short, again, strict=True):
                results[i] = r
        return [None if r == -1 else r == 1 for r in results]

    async def _write(self, writes: list[Write], lease_ttl_s: float, tails: bool) -> list[int]:
        """One round trip: a create per write script call, the steps in calls of the steps
        script (``write_commands``); each write's result code."""
        packed, carried = self.write_commands(writes, lease_ttl_s, tails)
        results = [0] * len(writes)
        for reply, indices in zip(await self._send(packed, True), carried, strict=True):
            if isinstance(reply, list):
                for i, r in zip(indices, reply, strict=True):
                    results[i] = r
            else:
                results[indices[0]] = reply
        return results

    def write_commands(
        self, writes: list[Write], lease_ttl_s: float, tails: bool = False
    ) -> tuple[list[bytes], list[list[int]]]:
        """The packed commands of ``writes`` and the writes each carries (their indices): a
        create in a call of the write script each, the steps in one call of the steps script
        per ``STEPS_PER_CALL``."""
        packed: list[bytes] = []
        carried: list[list[int]] = []
        steps: list[int] = []
        for i, w in enumerate(writes):
            if w.create:
                sha = self._scripts["write"].sha
                packed.append(wire.evalsha(sha, *self.write_calls([w], lease_ttl_s, tails)[0]))
                carried.append([i])
            else:
                steps.append(i)
        for at in range(0, len(steps), self.STEPS_PER_CALL):
            group = steps[at : at + self.STEPS_PER_CALL]
            packed.append(self.steps_command([writes[i] for i in group], lease_ttl_s, tails))
            carried.append(group)
        return packed, carried

    def steps_command(self, writes: list[Write], lease_ttl_s: float, tails: bool) -> bytes:
        """``steps_call`` packed here directly, a bulk string per argument and one join (the
        same bytes as ``wire.evalsha`` makes of it, at 1.9 against 4.6 us a write: 64
        writes of the benchmark's LSTM, 2-core AMD EPYC)."""
        bulk, bulk_int = wire.bulk, wire.bulk_int
        parts = [wire.evalsha_head(self._scripts["steps"].sha, len(writes) * 10 + 1, len(writes))]
        parts += [bulk((self.PREFIX + w.sid).encode()) for w in writes]
        parts.append(bulk_int(int(lease_ttl_s * 1000)))
        for w in writes:
            snap, n, tail = self._snap_args(w, tails)
            parts += (
                bulk_int(w.epoch),
                bulk(snap),
                bulk(w.resp or b""),
                bulk_int(w.rpos),
                bulk_int(self._ttl_ms(w)),
                _ONE if w.leased else _ZERO,
                bulk_int(w.steps),
                bulk_int(n),
                bulk(tail),
            )
        return b"".join(parts)

    def steps_call(self, writes: list[Write], lease_ttl_s: float, tails: bool = False) -> Call:
        """The steps script's (keys, args) for step writes (not creates)."""
        args: list[wire.Arg] = [int(lease_ttl_s * 1000)]
        for w in writes:
            snap, n, tail = self._snap_args(w, tails)
            args += [w.epoch, snap, w.resp or b"", w.rpos, self._ttl_ms(w), int(w.leased)]
            args += [w.steps, n, tail]
        return [self._key(w.sid) for w in writes], args

    def _ttl_ms(self, w: Write) -> int:
        return max(int(1000 * min(w.ttl_s, self.max_ttl_s)), 1)

    def write_calls(
        self, writes: list[Write], lease_ttl_s: float, tails: bool = False
    ) -> list[Call]:
        """The write script's (keys, args) for each write, one call each (a create's; the
        steps go in ``steps_call``: benchmarks.write_parts measures both ways)."""
        calls: list[Call] = []
        for w in writes:
            keys: list[wire.Arg] = [self._key(w.sid)]
            snap, n, tail = self._snap_args(w, tails)
            args: list[wire.Arg] = [
                w.epoch,
                snap,
                w.resp or b"",
                w.rpos,
                self._ttl_ms(w),
                int(w.leased),
                int(w.create),
                int(lease_ttl_s * 1000),
                w.steps,
                n,
                tail,
            ]
            if w.create:  # the quota's arguments: only a create reads them (not every step)
                quota = w.quota_max > 0 and w.quota_key is not None
                keys.append(self.QUOTA_PREFIX + cast(str, w.quota_key) if quota else keys[0])
                args += [
                    w.quota_max if quota else 0,
                    self.PREFIX,
                    w.sid,
                    int(1000 * self.max_ttl_s),
                ]
            calls.append((keys, args))
        return calls

    @staticmethod
    def _snap_args(w: Write, tails: bool) -> tuple[bytes, int, bytes]:
        """(``snap`` sent, the tail's length, the tail sent): a snapshot goes without its tail
        (``Write.tail``: the initial state, kept in the record since the create) unless it
        is a create or ``tails``. Profiled, a 4.3 KB write cost redis-server 16 us of CPU,
        its 2.2 KB without the tail 11 us (the benchmark's LSTM, 2-core AMD EPYC)."""
        n = w.tail
        if not n:
            return w.snap, 0, b""
        return w.snap[:-n], n, w.snap[-n:] if w.create or tails else b""

    async def take_tokens(self, key: str, want: int, rate: float, burst: float) -> int:
        (got,) = await self._pipeline("take", [([self.RATE_PREFIX + key], [rate, burst, want])])
        return int(got)

    async def load(self, sid: str) -> Record | None:
        (v,) = await self._pipeline("load", [([self._key(sid)], [])])
        if not v:
            return None
        snap, epoch, holder, left, resp, rpos, steps = v
        holder = holder.decode()
        return Record(
            sid,
            snap,
            int(epoch),
            holder,
            float(left) / 1000 if holder else 0.0,
            resp or None,
            int(rpos),
            steps=int(steps),
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
        _, epoch, snap, resp, rpos, steps = v
        rec = Record(
            sid, snap, int(epoch), holder, ttl_s, resp or None, int(rpos), steps=int(steps)
        )
        return Acquired(True, int(epoch), 0.0, rec)

    async def renew(self, leases: list[tuple[str, str, int]], ttl_s: float) -> list[bool]:
        calls: list[Call] = [([self._key(s)], [h, e, int(ttl_s * 1000)]) for s, h, e in leases]
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
