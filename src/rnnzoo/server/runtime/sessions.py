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
- ownership (``caller.py``): with authentication, a session belongs to the principal that
  created it; to any other principal it does not exist (NotFound, the same message as an
  unknown id, also for closed ones: existence is not revealed).
- quota: at most ``max_per_client`` live sessions per caller key (principal, or connection
  without authentication); over it ResourceExhausted names the quota and when to retry.
- the state store (``store/``; the in-memory one by default) holds every session; this table
  is the process's working set: ``adopt`` installs (or refreshes) a session read from the
  store; ``on_bury(session, why)`` tells the runtime what to do in the store (a close or
  eviction deletes it there; an idle expiry here only drops the cached copy, the store's own
  TTL decides there).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from rnnzoo.errors import InvalidArgument, NotFound, ResourceExhausted

from . import telemetry
from .caller import Caller, current
from .lease import Lease, Leases
from .model import Chunk
from .options import StepResult
from .redact import sid_tag
from .store import MemoryStore, StateStore

MAX_TOMBSTONES = 10_000


@dataclass(frozen=True)
class SessionInfo:
    id: str
    model: str
    created_at: float  # unix seconds
    ttl_s: float | None
    version: int = 0  # the model version the session runs on, to its end (0: unknown)


@dataclass
class Session:
    id: str
    model: str
    created_at: float
    last_used: float  # store clock
    initial: dict[str, np.ndarray]  # batch-1 states
    state: dict[str, np.ndarray]
    steps: int = 0
    buffer: list[Chunk] = field(default_factory=list)  # non-streamable: the chunks so far
    ttl_s: float | None = None  # idle seconds before expiry; None: never
    epoch: int = 0  # bumped on reset/close/expiry: a step in flight then drops its result
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    owner: str | None = None  # the principal that created it (authentication on), else None
    quota_key: str | None = None  # what its quota counts against (None: no quota)
    # (the position it answered, the last step's result): a retry of that position, over
    # either RPC kind, gets the same result again
    last: tuple[int, StepResult] | None = None
    fence: int = 0  # the store epoch this copy was read at (fences writes from outside a stream)
    # its store-only fields as the state store keeps them (durable.Records.meta), made once
    meta: dict[str, object] | None = field(default=None, repr=False, compare=False)
    # the state store's per-step encoder (snapshot.StepEncoder), made on its first write
    encoder: object = field(default=None, repr=False, compare=False)
    # the stream holding the session's lease in the state store when this copy was read
    # ("" none), and until when (this table's clock): a stream of another process
    held_by: str = ""
    held_until: float = 0.0


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
        max_per_client: int | None = None,
        state: StateStore | None = None,
    ) -> None:
        """``state``: the state store whose leases this table's mirror (default: an in-memory
        one on ``clock``)."""
        if on_full not in ("reject", "evict"):
            raise ValueError(f"on_full must be 'reject' or 'evict', got {on_full!r}")
        assert max_sessions >= 1
        self.max_sessions = max_sessions
        self.on_full = on_full
        self.ttl_s = ttl_s or None
        self.clock, self.wall = clock, wall
        self.max_tombstones = max_tombstones
        self._live: OrderedDict[str, Session] = OrderedDict()  # LRU order: oldest first
        self._dead: OrderedDict[str, tuple[str, str | None]] = OrderedDict()  # id -> (why, owner)
        self.max_per_client = max_per_client  # None: no per-client quota
        self._per_key: dict[str, int] = {}  # quota key -> live sessions
        self.state = state if state is not None else MemoryStore(clock=clock)
        self.leases = Leases(self.state, lease_ttl_s, clock)  # each attached session's stream
        self.on_bury: Callable[[Session, str], None] | None = None

    def __len__(self) -> int:
        return len(self._live)

    def _bury(self, sid: str, why: str) -> None:
        sess = self._live.pop(sid)
        if self.on_bury is not None:
            self.on_bury(sess, why)
        telemetry.session(why.split(" ", 1)[0], sess.model)  # closed, expired, evicted
        self.leases.forget(sid)
        sess.epoch += 1
        self._unquota(sess)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.wall()))
        self._dead[sid] = (f"{why} at {stamp}", sess.owner)
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
        self,
        model: str,
        initial: dict[str, np.ndarray],
        ttl_s: float | None = None,
        sid: str | None = None,
    ) -> Session:
        """A new session; ``sid``: its id when the caller derives it (a KServe sequence's),
        else a new random one."""
        ttl = self.check_ttl(ttl_s)  # before anything is evicted
        caller = current()
        key = caller.key if caller is not None and self.max_per_client else None
        # a key is only derived with a caller and a per-client limit set (the casts say so)
        if key is not None and self._per_key.get(key, 0) >= cast(int, self.max_per_client):
            self.sweep()  # expired sessions do not count against the quota
            if self._per_key.get(key, 0) >= cast(int, self.max_per_client):
                raise self.over_quota(cast(Caller, caller))
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
        if sid is None:
            sid = secrets.token_urlsafe(24)
        else:
            self._dead.pop(sid, None)  # a derived id may live again
        sess = Session(sid, model, self.wall(), now, initial, dict(initial), ttl_s=ttl)
        sess.owner = caller.principal if caller is not None else None
        sess.quota_key = key
        self._live[sid] = sess
        telemetry.session("created", model)
        if key is not None:
            self._per_key[key] = self._per_key.get(key, 0) + 1
        return sess

    def over_quota(self, caller: Caller, where: str = "") -> ResourceExhausted:
        """The refusal of a create over ``caller``'s session quota; ``where``: how the
        sessions were counted, if not here."""
        return ResourceExhausted(
            f"{caller.describe()} holds {self.max_per_client} live sessions{where}, its "
            f"quota (max_sessions_per_client={self.max_per_client}); close sessions it no "
            "longer needs (CloseSession) and retry, or retry after one expires"
            + (f" (idle TTL {self.ttl_s:g} s)" if self.ttl_s else "")
        )

    def get(self, sid: str, touch: bool = True) -> Session:
        sess = self._live.get(sid)
        now = self.clock()
        if sess is not None and self._expired(sess, now):
            self._bury(sid, f"expired after {sess.ttl_s:g} s idle")
            sess = None
        caller = current()
        principal = caller.principal if caller is not None else None
        if sess is not None and principal is not None and sess.owner != principal:
            sess = None  # another principal's session: it does not exist for this caller
        elif sess is None:
            why, owner = self._dead.get(sid, (None, None))
            if why and (principal is None or owner == principal):
                raise NotFound(f"session {sid_tag(sid)} was {why}; create a new session")
        if sess is None:
            raise NotFound(f"no session {sid_tag(sid)}; create one first (sessions are per server)")
        if touch:
            sess.last_used = now
            self._live.move_to_end(sid)
        return sess

    def adopt(
        self,
        sid: str,
        fill: Callable[[Session], None],
        model: str,
        created_at: float,
        initial: dict[str, np.ndarray],
        ttl_s: float | None,
        owner: str | None,
        quota_key: str | None,
    ) -> Session:
        """Install (or refresh) session ``sid`` read from a state store; ``fill`` sets its
        state, steps, buffer and dedup fields. The table is then a cache: at capacity the
        least recently used copy is dropped from memory (it stays in the store)."""
        sess = self._live.get(sid)
        if sess is None:
            self._dead.pop(sid, None)
            while len(self._live) >= self.max_sessions:
                oldest = next(iter(self._live))
                self._uncache(oldest)
            sess = Session(sid, model, created_at, self.clock(), initial, dict(initial))
            sess.ttl_s, sess.owner, sess.quota_key = ttl_s, owner, quota_key
            self._live[sid] = sess
            if quota_key is not None:
                self._per_key[quota_key] = self._per_key.get(quota_key, 0) + 1
        sess.initial = initial
        fill(sess)
        sess.last_used = self.clock()
        self._live.move_to_end(sid)
        return sess

    def _uncache(self, sid: str) -> None:
        """Drop a session's cached copy (no tombstone, no store change)."""
        sess = self._live.pop(sid)
        sess.epoch += 1
        self._unquota(sess)

    def _unquota(self, sess: Session) -> None:
        """A session leaves this process: its caller's live-session count drops by one."""
        if sess.quota_key is not None:
            n = self._per_key[sess.quota_key] - 1
            if n:
                self._per_key[sess.quota_key] = n
            else:
                del self._per_key[sess.quota_key]

    def gone(self, sid: str, why: str) -> None:
        """The store no longer has ``sid``: bury the cached copy (if any) with ``why``."""
        if sid in self._live:
            self._bury(sid, why)

    def count(self, key: str) -> int:
        """Live sessions counted against quota key ``key``."""
        return self._per_key.get(key, 0)

    def close(self, sid: str, why: str = "closed") -> None:
        self.get(sid, touch=False)
        self._bury(sid, why)

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
        # a session holds its version's key, "NAME@VERSION" (repository.py, ``pin``)
        name, sep, version = sess.model.rpartition("@")
        if not (sep and version.isdigit()):
            name, version = sess.model, "0"
        return SessionInfo(sess.id, name, sess.created_at, sess.ttl_s, int(version))
