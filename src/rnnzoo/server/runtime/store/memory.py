"""The in-memory store: the default when no ``--state-store`` is given.

The same interface and semantics as the shared stores (fenced writes, leases with epochs,
position records, quotas), kept in this process's dicts: sessions are lost on restart and
are not shared with other processes. Each call completes without awaiting anything, so a
call is atomic on the event loop, as one SQLite transaction or one Redis script is. Times come
from ``clock`` (the runtime passes its own, so that idle expiry agrees with the session
table's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .api import DEFAULT_MAX_TTL_S, Acquired, Record, StateStore, Write


@dataclass(slots=True)
class _Row:
    snap: bytes
    expires: float
    epoch: int = 0
    holder: str = ""
    lexp: float = 0.0  # the lease's expiry
    resp: bytes | None = None
    rpos: int = -1
    qkey: str | None = None
    value: object = None  # the writer's objects (snapshot, last result): never encoded


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class MemoryStore(StateStore):
    """Session id -> its row, in this process."""

    SWEEP_EVERY_S = 30.0

    def __init__(
        self, max_ttl_s: float = DEFAULT_MAX_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.url = "memory (this process only)"
        self.shared = False
        self.max_ttl_s = max_ttl_s
        self.clock = clock
        self.round_trips = 0
        self._rows: dict[str, _Row] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._last_sweep = clock()

    def __len__(self) -> int:
        return len(self._rows)

    def _live(self, sid: str, now: float) -> _Row | None:
        row = self._rows.get(sid)
        if row is not None and row.expires < now:
            del self._rows[sid]
            return None
        return row

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep <= self.SWEEP_EVERY_S:
            return
        self._last_sweep = now
        for sid in [sid for sid, row in self._rows.items() if row.expires < now]:
            del self._rows[sid]

    async def write(self, writes: list[Write], lease_ttl_s: float) -> list[bool | None]:
        self.round_trips += 1
        now = self.clock()
        out: list[bool | None] = []
        rows = self._rows
        for w in writes:
            expires = now + min(w.ttl_s, self.max_ttl_s)
            row = rows.get(w.sid)
            if row is not None and row.expires < now:
                del rows[w.sid]
                row = None
            if w.create:
                if w.quota_max > 0 and w.quota_key is not None:
                    live = sum(
                        1 for r in self._rows.values() if r.qkey == w.quota_key and r.expires >= now
                    )
                    if live >= w.quota_max:
                        out.append(None)
                        continue
                if row is not None:
                    out.append(False)
                    continue
                self._rows[w.sid] = _Row(w.snap, expires, qkey=w.quota_key, value=w.value)
                out.append(True)
                continue
            if row is None or row.epoch != w.epoch:
                out.append(False)
                continue
            if not w.leased and row.holder and row.lexp >= now:
                out.append(False)
                continue
            row.snap, row.resp, row.rpos, row.expires = w.snap, w.resp, w.rpos, expires
            row.value = w.value
            if w.leased and row.holder:
                row.lexp = now + lease_ttl_s
            out.append(True)
        if now - self._last_sweep > self.SWEEP_EVERY_S:
            self._sweep(now)
        return out

    async def take_tokens(self, key: str, want: int, rate: float, burst: float) -> int:
        self.round_trips += 1
        now = self.clock()
        b = self._buckets.get(key)
        tokens = burst if b is None else min(burst, b.tokens + max(0.0, now - b.at) * rate)
        got = max(0, min(want, int(tokens)))
        self._buckets[key] = _Bucket(tokens - got, now)
        return got

    async def load(self, sid: str) -> Record | None:
        self.round_trips += 1
        now = self.clock()
        row = self._live(sid, now)
        if row is None:
            return None
        left = row.lexp - now if row.holder else 0.0
        return Record(sid, row.snap, row.epoch, row.holder, left, row.resp, row.rpos, row.value)

    async def delete(self, sid: str) -> None:
        self.round_trips += 1
        self._rows.pop(sid, None)

    async def acquire(self, sid: str, holder: str, ttl_s: float) -> Acquired:
        self.round_trips += 1
        now = self.clock()
        row = self._live(sid, now)
        if row is None:
            return Acquired(True)
        if row.holder and row.holder != holder and row.lexp > now:
            return Acquired(False, row.epoch, row.lexp - now)
        row.epoch += 1
        row.holder, row.lexp = holder, now + ttl_s
        row.expires = max(row.expires, now + ttl_s)
        rec = Record(sid, row.snap, row.epoch, holder, ttl_s, row.resp, row.rpos, row.value)
        return Acquired(True, row.epoch, 0.0, rec)

    async def renew(self, leases: list[tuple[str, str, int]], ttl_s: float) -> list[bool]:
        self.round_trips += 1
        now = self.clock()
        out = []
        for sid, holder, epoch in leases:
            row = self._live(sid, now)
            ok = row is not None and row.holder == holder and row.epoch == epoch
            if ok and row is not None and row.lexp >= now:
                row.lexp = now + ttl_s
                row.expires = max(row.expires, row.lexp)  # a held session does not expire
                out.append(True)
            else:
                out.append(False)
        return out

    async def release(self, sid: str, holder: str, epoch: int) -> None:
        self.round_trips += 1
        row = self._rows.get(sid)
        if row is not None and row.holder == holder and row.epoch == epoch:
            row.holder, row.lexp = "", 0.0

    async def release_holders(self, prefix: str) -> int:
        self.round_trips += 1
        n = 0
        for row in self._rows.values():
            if row.holder.startswith(prefix):
                row.holder, row.lexp = "", 0.0
                n += 1
        return n
