"""The runtime's side of durable sessions: snapshots in and out of the session table, the
state store's reads and fenced writes, position-based deduplication.

- ``snapshot(sess)`` / ``install(snap)``: a session <-> ``Snapshot`` (snapshot.py);
- ``fresh(sid)``: with a store, re-read a session that this process does not hold by a
  stream's lease (another replica may have advanced it; after a restart memory is empty);
- ``persist(sess, ...)``: write the new state (and the response for deduplication) through
  the store before the response goes out: a fenced write, grouped per batch
  (``GroupWriter``); a fenced-off write is FailedPrecondition, an unreachable store
  Unavailable, and then the response is not sent and nothing changes in memory;
- ``position``: a request's expected position (steps before its chunk): equal to the
  session's -> apply; equal to the last applied chunk's -> its stored response again;
  anything else -> FailedPrecondition naming the session's position.
- store faults (issue 21): every write is a compare-and-set on the lease epoch and on the
  session's position (``Write.steps``), so it cannot land twice or after a newer one. A
  write the store did not confirm (``StoreOutcomeUnknown``: a timeout) marks the session
  *unsettled* at its position and is answered ABORTED naming the position to resend from;
  the session is read back from the store before its next request (``adopt``): a chunk
  that landed after all is then answered from the store (with a position), or, without
  one, refused once with FAILED_PRECONDITION naming where the session stands; a chunk that
  did not land is applied. A fenced-off write is named by reading the record back: the
  store lost the session (``StoreLost``), its lease moved, or its position moved.

Without a store, sessions are per process (as before); deduplication still works in memory.
"""

from __future__ import annotations

import asyncio

import numpy as np

from rnnzoo.errors import Aborted, FailedPrecondition, StoreLost, StoreOutcomeUnknown

from .caller import current
from .redact import sid_tag
from .sessions import Session
from .snapshot import Snapshot, from_bytes, model_hash, to_bytes
from .store import GroupWriter, StateStore, Write

MAX_UNSETTLED = 100_000


class Durability:
    def __init__(self, runtime, store: StateStore | None) -> None:
        self.rt = runtime
        self.store = store
        self.writer = GroupWriter(store, runtime.options.lease_ttl_s) if store else None
        self._deletes: set[asyncio.Task] = set()
        # session id -> the position before a write whose outcome is unknown (until read back)
        self.unsettled: dict[str, int] = {}
        # session id -> (that position, where the store had it): it had landed after all
        self.landed: dict[str, tuple[int, int]] = {}
        sessions = runtime.store
        sessions.leases.store = store
        if store is not None:
            sessions.on_bury = self._on_bury

    # ---- snapshots -------------------------------------------------------------------------
    def model_hash(self, model: str) -> str:
        entry = self.rt._entry(model)
        return model_hash([entry.graphs[r] for r in sorted(entry.graphs)])

    def snapshot(self, sess: Session, meta: bool = False) -> Snapshot:
        graph = self.rt._entry(sess.model).graphs["model"]
        snap = Snapshot(
            sess.model,
            self.model_hash(sess.model),
            sess.steps,
            dict(sess.state),
            dict(sess.initial),
            list(sess.buffer),
            dict(graph.contract.source or {}),
        )
        if meta:
            snap.meta = self.meta(sess)
        return snap

    @staticmethod
    def meta(sess: Session) -> dict:
        """The store-only fields of ``sess`` (never sent to clients)."""
        return {
            "created_at": sess.created_at,
            "ttl_s": sess.ttl_s,
            "owner": sess.owner,
            "quota_key": sess.quota_key,
        }

    def check_snapshot(self, snap: Snapshot) -> None:
        """FailedPrecondition unless this server serves the snapshot's model version."""
        self.rt._single(snap.model, "a session")
        have = self.model_hash(snap.model)
        if snap.model_hash != have:
            version = ", ".join(f"{k}={v}" for k, v in sorted(snap.source.items()))
            raise FailedPrecondition(
                f"this snapshot was taken from another version of model {snap.model!r}: it "
                f"needs graph hash {snap.model_hash[:16]}"
                + (f" ({version})" if version else "")
                + f", this server serves {have[:16]}; restore it on a server that serves that "
                "version (a snapshot's state means nothing to other weights)"
            )

    @staticmethod
    def fill(sess: Session, snap: Snapshot) -> None:
        sess.state, sess.steps, sess.buffer = dict(snap.state), snap.steps, list(snap.buffer)
        sess.initial = dict(snap.initial)

    # ---- reads -----------------------------------------------------------------------------
    async def fresh(self, sid: str) -> None:
        """With a store: refresh ``sid``'s cached copy from the store unless a live stream of
        this process holds it (then the copy here is the newest)."""
        if self.store is None:
            return
        held = self.rt.store.leases.holder_alive(sid)
        if held is not None and sid in self.rt.store._live and sid not in self.unsettled:
            return
        rec = await self.store.load(sid)
        if rec is None:
            self.unsettled.pop(sid, None)
            self.rt.store.gone(
                sid,
                "gone from the state store (closed elsewhere, expired, or the store lost it: "
                "it restarted without persistence)",
            )
            return
        self.adopt(sid, from_bytes(rec.snap), rec.epoch, rec.resp, rec.rpos)

    def adopt(self, sid: str, snap: Snapshot, epoch: int, resp: bytes | None, rpos: int):
        m = snap.meta
        before = self.unsettled.pop(sid, None)
        if before is not None and snap.steps != before and rpos == before and resp:
            self.landed[sid] = (before, snap.steps)  # the unsettled write had landed

        def fill(sess: Session) -> None:
            self.fill(sess, snap)
            sess.fence = epoch
            sess.last = (rpos, resp) if resp and rpos >= 0 else None

        return self.rt.store.adopt(
            sid,
            fill,
            snap.model,
            m.get("created_at", 0.0),
            dict(snap.initial),
            m.get("ttl_s"),
            m.get("owner"),
            m.get("quota_key"),
        )

    # ---- writes ----------------------------------------------------------------------------
    def _ttl(self, sess: Session) -> float:
        return sess.ttl_s or float(self.store.max_ttl_s)  # type: ignore[union-attr]

    async def create(self, sess: Session) -> None:
        """Write a new session through the store (CreateSession, restore, fork)."""
        if self.store is None:
            return
        snap = to_bytes(self.snapshot(sess, meta=True))
        sessions = self.rt.store
        # the session quota, counted in the store: N processes do not multiply it
        quota = (sessions.max_per_client or 0) if sess.quota_key is not None else 0
        w = Write(
            sess.id,
            0,
            snap,
            self._ttl(sess),
            create=True,
            quota_key=sess.quota_key,
            quota_max=quota,
            steps=sess.steps,
        )
        ok = await self.writer.write(w)
        if ok is None:
            caller = current()
            assert caller is not None  # a quota key comes from the caller
            raise sessions.over_quota(caller, " across the servers sharing the state store")
        if not ok:  # pragma: no cover - 192 random bits
            raise FailedPrecondition(f"session id {sid_tag(sess.id)} exists in the store")
        sess.durable, sess.fence = True, 0

    async def write(self, sess: Session, snap: Snapshot, lease, resp: bytes | None, rpos: int):
        """Fenced write of ``snap`` as ``sess``'s new state (before its response goes out)."""
        if self.store is None or not sess.durable:
            return
        snap.meta = self.meta(sess)
        epoch = lease.epoch if lease is not None else sess.fence
        w = Write(sess.id, epoch, to_bytes(snap), self._ttl(sess), resp, rpos, lease is not None)
        w.steps = snap.steps
        before = rpos if rpos >= 0 else sess.steps
        try:
            ok = await self.writer.write(w)
        except StoreOutcomeUnknown as exc:
            self.unsettled[sess.id] = before
            if len(self.unsettled) > MAX_UNSETTLED:  # bounded: the oldest are forgotten
                self.unsettled.pop(next(iter(self.unsettled)))
            raise Aborted(
                f"session {sid_tag(sess.id)}: {exc}, so whether this request was applied is "
                "unknown. Nothing is lost: the session is read back from the store before its "
                f"next request. Resend it with position={before} (if it was applied you get "
                "its stored outputs, else it is applied now); without a position, resend it "
                "and the server first says where the session stands if it had landed; it was "
                f"at position {before}"
            ) from None
        if not ok:
            if lease is not None:
                self.rt.store.leases.lost(lease)
            raise await self._fenced(sess, epoch, rpos)

    async def _fenced(self, sess: Session, epoch: int, rpos: int) -> Exception:
        """Why the store refused a fenced write of ``sess``: read its record back."""
        tag = sid_tag(sess.id)
        dropped = "this result was dropped and changed nothing"
        try:
            rec = await self.store.load(sess.id)
        except Exception:  # unreachable now: say what is known
            rec = False
        if rec is None:
            return self.lost(sess.id, f"; {dropped}")
        if rec is not False and rec.epoch == epoch and rpos >= 0 and rec.steps not in (-1, rpos):
            if rec.rpos == rpos and rec.resp:
                return Aborted(
                    f"session {tag}: this chunk was already applied by an earlier attempt whose "
                    f"answer was lost (the store has the session at position {rec.steps}); "
                    f"{dropped}. Resend it with position={rpos} to get its stored outputs, or "
                    f"continue from position {rec.steps}"
                )
            return Aborted(
                f"session {tag} is at position {rec.steps} in the state store, not {rpos} as "
                f"this server had it (an earlier write landed late); {dropped}. Continue "
                f"from position {rec.steps}"
            )
        return FailedPrecondition(
            f"session {tag} moved on elsewhere while this request ran (its lease ran out and "
            f"another stream or server took it): {dropped}. Open a new stream to resume the "
            "session from where it stands"
        )

    def lost(self, sid: str, what: str = "") -> StoreLost:
        """A session this process knew as durable is not in the store any more."""
        self.unsettled.pop(sid, None)
        self.landed.pop(sid, None)
        self.rt.store.gone(sid, "lost by the state store (it restarted without persistence)")
        return StoreLost(
            f"session {sid_tag(sid)}: the state store no longer has this session (it restarted "
            f"without persistence, or lost data){what}. Create a new session, or restore one "
            "from a snapshot you kept"
        )

    def check_position(self, sess: Session, position: int | None) -> bytes | None:
        """``check_position`` after a store fault: a session whose last write is unsettled
        (not read back yet) is Aborted; one whose unsettled write had landed refuses one
        request without a position, saying where the session stands."""
        before = self.unsettled.get(sess.id)
        if before is not None:
            raise Aborted(
                f"session {sid_tag(sess.id)}: the outcome of the request at position {before} "
                "is not settled yet (the state store did not confirm it); open a new stream "
                f"(it reads the session back) and resend with position={before}"
            )
        landed = self.landed.pop(sess.id, None)
        if landed is not None and position is None:
            at, now = landed
            raise FailedPrecondition(
                f"session {sid_tag(sess.id)}: the request sent at position {at}, whose outcome "
                f"was unknown, was applied after all; do not send it again (resend it with "
                f"position={at} for its outputs). The session is at position {now}: continue "
                f"from position {now}"
            )
        return check_position(sess, position)

    def _on_bury(self, sess: Session, why: str) -> None:
        if not sess.durable or not why.startswith(("closed", "evicted")):
            return  # an idle expiry here: the store's own TTL decides there
        task = asyncio.get_running_loop().create_task(self.store.delete(sess.id))
        self._deletes.add(task)
        task.add_done_callback(self._deletes.discard)

    async def settle(self) -> None:
        await asyncio.gather(*self._deletes, return_exceptions=True)
        await self.rt.store.leases.settle()

    async def close(self) -> None:
        if self.store is not None:
            live = [lease for lease, _, _ in self.rt._streams.values()]
            for lease in live:
                self.rt.store.leases.release(lease)
            await self.settle()
            await self.store.close()


def check_position(sess: Session, position: int | None) -> bytes | None:
    """Deduplication by position: None to apply the chunk, or the stored response to send
    again; FailedPrecondition for any other position."""
    if position is None or position == sess.steps:
        return None
    if sess.last is not None and position == sess.last[0]:
        return sess.last[1]
    tag = sid_tag(sess.id)
    if position > sess.steps:
        raise FailedPrecondition(
            f"session {tag} is at position {sess.steps} (steps applied) but this request "
            f"expects position {position}: a gap. Resend the chunks from position {sess.steps}"
        )
    raise FailedPrecondition(
        f"session {tag} is at position {sess.steps} (steps applied); this request expects "
        f"position {position}, which was applied before its last chunk (only the last "
        f"chunk's response is kept). Continue from position {sess.steps}"
    )


def batch_free(graph, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A session's batch-1 states -> one sequence's states without the batch axis, context
    windows (``context:NAME``) included: they are state (model.py)."""
    return graph.unbatch_state(state)
