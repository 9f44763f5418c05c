"""The state store's interface, split by concern: session records, leases, quotas.

Every store (``MemoryStore``, ``SqliteStore``, ``RedisStore``) implements all three; the
runtime always has one (``open_store``: no ``--state-store`` -> the in-memory store).


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

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

DEFAULT_MAX_TTL_S = 7 * 86400.0  # a session without an idle TTL still expires from the store


@dataclass(slots=True)
class Record:
    sid: str
    snap: bytes
    epoch: int
    holder: str  # "" when no lease is held
    lease_left_s: float  # seconds until the lease runs out (<= 0: free)
    resp: bytes | None  # the last step's result (deduplication), None before the first
    rpos: int  # the position that result answered (steps before its chunk); -1: none
    # the written objects themselves, from a store that keeps objects (``shared`` False:
    # the memory store); then ``snap`` and ``resp`` are empty
    value: object = None
    steps: int = -1  # the session's position as stored (-1: not recorded, an older record)


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
    # what ``snap``/``resp`` encode, for a store that keeps objects (``shared`` False); the
    # writer then leaves ``snap`` and ``resp`` empty (encoding costs ~22 µs per step)
    value: object = None
    # the session's position after this write (-1: not known). A write with ``rpos`` >= 0
    # is also a compare-and-set on the position: applied only while the stored position is
    # ``rpos`` (the chunk's start), so a write that lands late or twice changes nothing
    steps: int = -1
    # the last ``tail`` bytes of ``snap`` are the session's initial state (0: not known),
    # which never changes for a session: a store may keep them from an earlier write and
    # send only the rest (Redis: half the bytes of an LSTM's step). ``snap`` is still the
    # whole snapshot, for a store that writes it whole (SQLite)
    tail: int = 0


@dataclass(slots=True)
class Acquired:
    ok: bool
    epoch: int = 0
    held_for_s: float = 0.0  # not ok: seconds until the current holder's lease runs out
    record: Record | None = None  # ok: the session as stored (None: no such session)


class SessionRecords(Protocol):
    """Session records: a snapshot, the last response and its position, fenced writes."""

    url: str  # for messages, without a password
    round_trips: int = 0  # store calls made (tests check writes are grouped per batch)
    max_ttl_s: float  # a record without an idle TTL still expires after this
    # True: other processes may read and write the same records (SQLite, Redis): records
    # travel as bytes (``snap``, ``resp``) and a call is a round trip worth coalescing
    # (``GroupWriter``). False: this process's memory: the store keeps the written ``value``
    # objects as they are and a call completes at once.
    shared: bool = True

    async def write(self, writes: list[Write], lease_ttl_s: float) -> list[bool | None]:
        """Apply fenced writes in one round trip; one result each: True applied, False
        fenced off (or, for a create, the id exists), None a create over its quota."""
        ...

    async def load(self, sid: str) -> Record | None: ...

    async def delete(self, sid: str) -> None: ...

    async def close(self) -> None:
        return None


class LeaseStore(Protocol):
    """Leases: one holder per session at a time, an epoch bumped on every take-over."""

    async def acquire(self, sid: str, holder: str, ttl_s: float) -> Acquired:
        """Take the session's lease (epoch + 1) unless another holder's is alive."""
        ...

    async def renew(self, leases: list[tuple[str, str, int]], ttl_s: float) -> list[bool]:
        """(sid, holder, epoch) leases -> renewed? (False: it moved on), one round trip."""
        ...

    async def release(self, sid: str, holder: str, epoch: int) -> None: ...

    async def release_holders(self, prefix: str) -> int:
        """Free every lease whose holder id starts with ``prefix`` (a dead process's tag,
        lease.process_tag); returns how many. Only for holders known to be dead: their
        epochs stay, and the next acquire bumps them as after an expiry."""
        ...


class QuotaStore(Protocol):
    """Quotas shared by every process using the store. The session quota is counted in a
    creating ``Write`` (``quota_key``, ``quota_max``); the request rate is a token bucket."""

    async def take_tokens(self, key: str, want: int, rate: float, burst: float) -> int:
        """The shared token bucket ``key`` (refilled at ``rate``/s, at most ``burst``):
        take up to ``want`` whole tokens; returns how many it gave (0 when empty)."""
        ...


class StateStore(SessionRecords, LeaseStore, QuotaStore, Protocol):
    """Where sessions live: all three concerns. All methods are coroutines; a store that
    cannot be reached raises Unavailable saying so."""


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
