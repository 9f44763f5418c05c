"""The session store: unguessable ids, idle TTL, capacity, tombstones, one attached stream.

- ids: ``secrets.token_urlsafe(24)`` (192 random bits).
- idle TTL: a session unused for its ``ttl_s`` expires; checked on every access and by the
  runtime's sweeper. The store's ``ttl_s`` (None or 0: no expiry) is the default and the
  ceiling: a session may ask for a shorter one, never a longer one. The clock is injectable.
- capacity: at ``max_sessions`` a new session is refused (``on_full="reject"``,
  ResourceExhausted) or the least recently used one is evicted (``"evict"``).
- a closed/expired/evicted id answers NotFound saying why and when; tombstones are bounded
  (oldest forgotten first), after which the id is simply unknown.
- steps of one session run in order: each session has an asyncio.Lock (FIFO wake-up).
- one stream at a time: attaching takes the session's lease (``lease.py``); a failed attach
  does not count as use (it leaves the idle TTL alone).
- ids are secrets: messages show ``sid_tag(id)``, a short prefix, never the whole id.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rnnzoo.errors import InvalidArgument, NotFound, ResourceExhausted

from .lease import Lease, Leases
from .redact import sid_tag

MAX_TOMBSTONES = 10_000


@dataclass(frozen=True)
class SessionInfo:
    id: str
    model: str
    created_at: float  # unix seconds
    ttl_s: float | None


@dataclass
class Session:
    id: str
    model: str
    created_at: float
    last_used: float  # store clock
    initial: dict[str, np.ndarray]  # batch-1 states
    state: dict[str, np.ndarray]
    steps: int = 0
    buffer: list = field(default_factory=list)  # non-streamable models: the chunks so far
    ttl_s: float | None = None  # idle seconds before expiry; None: never
    epoch: int = 0  # bumped on reset/close/expiry: a step in flight then drops its result
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SessionStore:
    def __init__(
        self,
        max_sessions: int = 10_000,
        on_full: str = "reject",
        ttl_s: float | None = 600.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_tombstones: int = MAX_TOMBSTONES,
        lease_ttl_s: float = 30.0,
    ) -> None:
        if on_full not in ("reject", "evict"):
            raise ValueError(f"on_full must be 'reject' or 'evict', got {on_full!r}")
        assert max_sessions >= 1
        self.max_sessions = max_sessions
        self.on_full = on_full
        self.ttl_s = ttl_s or None
        self.clock, self.wall = clock, wall
        self.max_tombstones = max_tombstones
        self._live: OrderedDict[str, Session] = OrderedDict()  # LRU order: oldest first
        self._dead: OrderedDict[str, str] = OrderedDict()  # id -> why (with when)
        self.leases = Leases(lease_ttl_s, clock)  # which stream each attached session has

    def __len__(self) -> int:
        return len(self._live)

    def _bury(self, sid: str, why: str) -> None:
        sess = self._live.pop(sid)
        self.leases.forget(sid)
        sess.epoch += 1
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.wall()))
        self._dead[sid] = f"{why} at {stamp}"
        while len(self._dead) > self.max_tombstones:
            self._dead.popitem(last=False)

    def _expired(self, sess: Session, now: float) -> bool:
        return sess.ttl_s is not None and now - sess.last_used > sess.ttl_s

    def check_ttl(self, ttl_s: float | None) -> float | None:
        """A session's TTL: ``None`` -> the store's; a requested one must be > 0 and no longer
        than the store's (the server's limit protects its memory)."""
        if ttl_s is None:
            return self.ttl_s
        if not ttl_s > 0 or ttl_s == float("inf"):
            raise InvalidArgument(f"ttl_s must be a positive number of seconds, got {ttl_s}")
        if self.ttl_s is not None and ttl_s > self.ttl_s:
            raise InvalidArgument(
                f"ttl_s={ttl_s:g} is longer than this server's session TTL of {self.ttl_s:g} s; "
                "ask for at most that, or leave ttl_s unset"
            )
        return ttl_s

    def create(
        self, model: str, initial: dict[str, np.ndarray], ttl_s: float | None = None
    ) -> Session:
        ttl = self.check_ttl(ttl_s)  # before anything is evicted
        if len(self._live) >= self.max_sessions:
            self.sweep()  # expired sessions do not count against the capacity
        if len(self._live) >= self.max_sessions:
            if self.on_full == "reject":
                raise ResourceExhausted(
                    f"the server holds its maximum of {self.max_sessions} sessions; close "
                    "sessions you no longer need, or retry later"
                )
            oldest = next(iter(self._live))
            self._bury(
                oldest,
                f"evicted (least recently used; server full at {self.max_sessions} sessions)",
            )
        now = self.clock()
        sid = secrets.token_urlsafe(24)
        sess = Session(sid, model, self.wall(), now, initial, dict(initial), ttl_s=ttl)
        self._live[sid] = sess
        return sess

    def get(self, sid: str, touch: bool = True) -> Session:
        sess = self._live.get(sid)
        now = self.clock()
        if sess is not None and self._expired(sess, now):
            self._bury(sid, f"expired after {sess.ttl_s:g} s idle")
            sess = None
        if sess is None:
            why = self._dead.get(sid)
            if why:
                raise NotFound(f"session {sid_tag(sid)} was {why}; create a new session")
            raise NotFound(f"no session {sid_tag(sid)}; create one first (sessions are per server)")
        if touch:
            sess.last_used = now
            self._live.move_to_end(sid)
        return sess

    def close(self, sid: str) -> None:
        self.get(sid, touch=False)
        self._bury(sid, "closed")

    def sweep(self) -> int:
        """Expire idle sessions; returns how many."""
        now = self.clock()
        dead = [s for s in self._live.values() if self._expired(s, now)]
        for sess in dead:
            self._bury(sess.id, f"expired after {sess.ttl_s:g} s idle")
        return len(dead)

    def attach(self, sid: str, holder: str) -> Lease:
        """Take ``sid``'s lease for ``holder`` (FailedPrecondition while another holder's is
        alive). Only a successful attach counts as use of the session."""
        self.get(sid, touch=False)
        lease = self.leases.acquire(sid, holder)
        self.get(sid)
        return lease

    def detach(self, sid: str, lease: Lease) -> None:
        sess = self._live.get(sid)
        if self.leases.release(lease) and sess is not None:
            sess.last_used = self.clock()  # the stream's end is its last use
            self._live.move_to_end(sid)

    def info(self, sess: Session) -> SessionInfo:
        return SessionInfo(sess.id, sess.model, sess.created_at, sess.ttl_s)
