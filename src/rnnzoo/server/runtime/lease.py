"""Who may advance a session: a lease, held by one stream at a time.

A stream that names a session acquires its lease; while the stream lives the runtime renews
it (every ``ttl_s / 3``, and on every chunk); the stream's end releases it. A holder that
stops renewing (its peer died, its process froze, or, once sessions live in a shared store,
its server process died) loses the lease at ``expires_at`` and the next stream takes it over.

Every take-over bumps ``epoch``: a fencing token. A step computed under a lease commits its
new state only while that lease is still the session's (``Leases.current``), so a paused old
holder cannot overwrite state after its lease moved on.

Kept deliberately small and plain (a dataclass and a table keyed by session id) so that the
state store persists exactly these fields, and it does (every runtime has one: ``store/``,
the in-memory one by default): ``take`` acquires the lease in the store (epoch from the store, expiry on the
store's clock) and keeps the local copy in this table; ``renew_in_store`` renews the leases of
live streams there in one round trip; every state write carries the lease's epoch and the
store applies it only while that epoch is current (the fencing check, in the same round trip).
The in-process take-over from a dead stream and the take-over of a dead process's session are
the same step: the old lease ran out, the next ``take`` bumps the epoch. Holder ids start with
their process's tag (``new_holder``): when a supervisor knows a worker process is dead it
frees that process's leases in the store at once (``StateStore.release_holders``), and the
next ``take`` bumps the epoch as after an expiry.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from rnnzoo.errors import FailedPrecondition, StoreLost

from .redact import sid_tag
from .store import LeaseStore, Record


def process_tag(pid: int | None = None) -> str:
    """``host/pid`` of a serving process (default: this one): the prefix of its holders'
    ids, so that whoever sees the process dead (the ``--workers`` supervisor) can free its
    leases in the state store at once instead of waiting for them to run out."""
    return f"{socket.gethostname()}/{pid if pid is not None else os.getpid()}"


def new_holder() -> str:
    """A new holder id for a stream: this process's tag, then 64 random bits."""
    return f"{process_tag()}:{secrets.token_hex(8)}"


@dataclass(slots=True)
class Lease:
    key: str  # the session id
    holder: str  # who holds it (a stream's id)
    epoch: int  # fencing token: grows on every acquire of this key
    acquired_at: float  # the table's clock
    expires_at: float  # renewed while the holder lives

    def alive(self, now: float) -> bool:
        return now < self.expires_at


class Leases:
    """Session id -> its current lease. One holder at a time; an expired lease is free."""

    def __init__(
        self, store: LeaseStore, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self.clock = clock
        self.store = store  # where the leases live for every process sharing it
        self._held: dict[str, Lease] = {}
        self._epochs: dict[str, int] = {}  # key -> last epoch handed out
        self._releases: set[asyncio.Task[None]] = set()
        # key -> (holder, epoch) of a store release that failed (the store was unreachable):
        # sent again before this process takes the key again, so that a stream reopened
        # after a store outage does not wait out its own dead stream's lease (issue 21: 20 s)
        self._unreleased: dict[str, tuple[str, int]] = {}  # store releases in flight

    def __len__(self) -> int:
        return len(self._held)

    def holder_alive(self, key: str) -> Lease | None:
        """The key's lease if a holder has it and it has not expired, else None."""
        lease = self._held.get(key)
        if lease is not None and lease.alive(self.clock()):
            return lease
        return None

    def acquire(self, key: str, holder: str) -> Lease:
        """A new lease on ``key`` for ``holder``; FailedPrecondition while another holder's
        lease is alive, saying when it runs out if not renewed."""
        now = self.clock()
        held = self._held.get(key)
        if held is not None and held.alive(now):
            raise FailedPrecondition(
                f"session {sid_tag(key)} is already attached to another stream (since "
                f"{now - held.acquired_at:.1f} s ago); its lease runs out in "
                f"{held.expires_at - now:.1f} s unless that stream is alive and renews it. "
                "Close that stream, or retry after the lease runs out (one stream per session "
                "at a time)"
            )
        return self._install(key, holder, self._epochs.get(key, 0) + 1)

    def _install(self, key: str, holder: str, epoch: int) -> Lease:
        now = self.clock()
        self._epochs[key] = epoch
        lease = Lease(key, holder, epoch, now, now + self.ttl_s)
        self._held[key] = lease
        return lease

    async def take(self, key: str, holder: str) -> tuple[Lease, Record]:
        """``acquire`` through the store: the store grants the lease and its epoch unless
        another holder's (in any process) is alive. Returns (lease, the store's Record);
        NotFound when the store no longer has the session."""
        held = self.holder_alive(key)
        if held is not None and held.holder != holder:
            self.acquire(key, holder)  # raises, with this process's wording
        await self.settle()  # this process's releases in flight land first
        stale = self._unreleased.pop(key, None)
        if stale is not None:
            try:
                await self.store.release(key, *stale)
            except Exception:
                self._unreleased[key] = stale
        got = await self.store.acquire(key, holder, self.ttl_s)
        if not got.ok:
            raise FailedPrecondition(
                f"session {sid_tag(key)} is attached to an open stream on another server "
                f"process, which owns it while it is open; its lease runs out in "
                f"{got.held_for_s:.1f} s unless that stream renews it. Close that stream, or "
                "retry after the lease runs out (one stream per session at a time)"
            )
        if got.record is None:
            raise StoreLost(
                f"session {sid_tag(key)}: the state store no longer has this session (closed "
                "elsewhere, expired, or the store restarted without persistence or lost data); "
                "create a new session, or restore one from a snapshot you kept"
            )
        return self._install(key, holder, got.epoch), got.record

    async def renew_in_store(self, leases: list[Lease]) -> int:
        """Renew these leases in the store (one round trip); a lease the store no longer
        grants (it ran out and moved on) is dropped here too. Returns how many renewed."""
        if not leases:
            return 0
        oks = await self.store.renew([(x.key, x.holder, x.epoch) for x in leases], self.ttl_s)
        for lease, ok in zip(leases, oks, strict=True):
            if not ok and self._held.get(lease.key) is lease:
                lease.expires_at = self.clock()  # no longer current: its writes are fenced
        return sum(oks)

    def lost(self, lease: Lease) -> None:
        """The store fenced a write of ``lease`` off: it is no longer current here either."""
        if self._held.get(lease.key) is lease:
            lease.expires_at = self.clock()

    def current(self, lease: Lease) -> bool:
        """Is ``lease`` still its key's lease, unexpired? (The fencing check before a write.)"""
        return self._held.get(lease.key) is lease and lease.alive(self.clock())

    def renew(self, lease: Lease) -> bool:
        """Push ``lease``'s expiry to now + ttl; False if it is no longer the key's lease."""
        if self._held.get(lease.key) is not lease:
            return False
        now = self.clock()
        if not lease.alive(now):
            return False  # expired: a new holder may already have read the state
        lease.expires_at = now + self.ttl_s
        return True

    def release(self, lease: Lease) -> bool:
        """Give the key up; False (nothing done) if ``lease`` is not its current lease."""
        if self._held.get(lease.key) is not lease:
            return False
        del self._held[lease.key]
        try:
            task = asyncio.get_running_loop().create_task(self._release_in_store(lease))
        except RuntimeError:  # no loop: the store lease runs out by itself
            return True
        self._releases.add(task)
        task.add_done_callback(_settled(self._releases))
        return True

    async def _release_in_store(self, lease: Lease) -> None:
        try:
            await self.store.release(lease.key, lease.holder, lease.epoch)
        except Exception:
            if len(self._unreleased) < 100_000:
                self._unreleased[lease.key] = (lease.holder, lease.epoch)
            raise

    async def settle(self) -> None:
        """Wait for store releases in flight (a clean stop frees its sessions at once)."""
        if self._releases:
            # wait, not gather: a waiter cancelled (a stream's call ended by its peer) must
            # not cancel the releases themselves
            await asyncio.wait(set(self._releases))

    def forget(self, key: str) -> None:
        """The session is gone (closed, expired, evicted): drop its lease and epoch."""
        self._held.pop(key, None)
        self._epochs.pop(key, None)
        self._unreleased.pop(key, None)


def _settled(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an unreachable store only delays the expiry

    return done
