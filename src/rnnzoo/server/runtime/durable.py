"""Sessions in the state store: snapshots in and out of the session table, reads, fenced
writes, and what a refused write means.

Every runtime has a state store (``store/``: the in-memory one without ``--state-store``),
and every session is in it, so every path reads and writes sessions the same way:

- ``snapshot(sess)`` / ``fill(sess, snap)``: a session <-> ``Snapshot`` (snapshot.py);
- ``fresh(sid)``: re-read a session that no live stream of this process holds (another
  process may have advanced it; after a restart memory is empty), with the holder of its
  lease in the store (a stream of another process: ``Session.held_by``);
- ``create(sess)``: a new session (CreateSession, restore, fork, a KServe sequence's start),
  its quota counted in the store;
- ``write(...)``: a step's new state and its result through the store before the response
  goes out: a fenced write (the lease's epoch, or the epoch the copy was read at), grouped
  per batch for a shared store (``GroupWriter``). A refused write is FailedPrecondition
  saying what happened (the stream's lease ran out; a stream of another process holds the
  session; another request advanced it; it is gone); an unreachable store is Unavailable;
  either way the response is not sent and nothing changes in memory;
- ``check_position``: a request's expected position (steps before its chunk): equal to the
  session's -> apply; equal to the last applied chunk's -> its kept result again (whatever
  RPC applied it); anything else -> FailedPrecondition naming the session's position.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from rnnzoo.errors import FailedPrecondition, NotFound

from .caller import current
from .catalog import Catalog
from .lease import Lease
from .model import Chunk, ServedModel
from .options import StepResult
from .redact import sid_tag
from .sessions import Session, SessionStore
from .snapshot import (
    Snapshot,
    StepEncoder,
    from_bytes,
    model_hash,
    result_from_bytes,
    result_to_bytes,
    to_bytes,
)
from .store import GroupWriter, Record, StateStore, Write


class Records:
    """The session table's side of the state store."""

    def __init__(
        self, sessions: SessionStore, store: StateStore, catalog: Catalog, lease_ttl_s: float
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.catalog = catalog
        self.lease_ttl_s = lease_ttl_s
        self.writer = GroupWriter(store, lease_ttl_s) if store.shared else None
        self._deletes: set[asyncio.Task[None]] = set()
        sessions.on_bury = self._on_bury

    # ---- snapshots -------------------------------------------------------------------------
    def model_hash(self, model: str) -> str:
        entry = self.catalog.entry(model)
        return model_hash([entry.graphs[r] for r in sorted(entry.graphs)])

    def snapshot(
        self,
        sess: Session,
        state: dict[str, np.ndarray] | None = None,
        steps: int | None = None,
        buffer: list[Chunk] | None = None,
        meta: bool = False,
    ) -> Snapshot:
        """``sess`` as a Snapshot; ``state``/``steps``/``buffer``: a change not committed yet."""
        graph = self.catalog.entry(sess.model).graphs["model"]
        snap = Snapshot(
            sess.model,
            self.model_hash(sess.model),
            sess.steps if steps is None else steps,
            dict(sess.state if state is None else state),
            dict(sess.initial),
            list(sess.buffer if buffer is None else buffer),
            dict(graph.contract.source or {}),
        )
        if meta:
            snap.meta = self.meta(sess)
        return snap

    @staticmethod
    def meta(sess: Session) -> dict[str, Any]:
        """The store-only fields of ``sess`` (never sent to clients)."""
        return {
            "created_at": sess.created_at,
            "ttl_s": sess.ttl_s,
            "owner": sess.owner,
            "quota_key": sess.quota_key,
        }

    def check_snapshot(self, snap: Snapshot) -> None:
        """FailedPrecondition unless this server serves the snapshot's model version."""
        self.catalog.single(snap.model, "a session")
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
    async def fresh(self, sid: str) -> Session:
        """``sid`` as the store has it now (unless a live stream of this process holds it:
        then the copy here is the newest); NotFound, saying why, when it is gone."""
        sessions = self.sessions
        if sessions.leases.holder_alive(sid) is not None and sid in sessions._live:
            return sessions.get(sid)
        rec = await self.store.load(sid)
        if rec is None:
            sessions.get(sid, touch=False)  # a reason known here first (expired, closed)
            sessions.gone(sid, "gone from the state store (closed elsewhere, or expired)")
            return sessions.get(sid)  # raises NotFound
        self.adopt(rec)
        return sessions.get(sid)

    def adopt(self, rec: Record) -> Session:
        """Install (or refresh) the session ``rec`` holds."""
        if rec.value is not None:
            snap, last = rec.value  # type: ignore[misc]  # the memory store's objects
        else:
            snap = from_bytes(rec.snap)
            last = result_from_bytes(rec.resp) if rec.resp else None
        m = snap.meta
        now = self.sessions.clock()

        def fill(sess: Session) -> None:
            self.fill(sess, snap)
            sess.fence = rec.epoch
            sess.last = (rec.rpos, last) if last is not None and rec.rpos >= 0 else None
            live = rec.holder and rec.lease_left_s > 0
            sess.held_by = rec.holder if live else ""
            sess.held_until = now + rec.lease_left_s if live else 0.0

        return self.sessions.adopt(
            rec.sid,
            fill,
            snap.model,
            m.get("created_at", 0.0),
            dict(snap.initial),
            m.get("ttl_s"),
            m.get("owner"),
            m.get("quota_key"),
        )

    def held_elsewhere(self, sess: Session, lease: Lease | None) -> str | None:
        """The holder of a live lease on ``sess`` other than ``lease``: a stream of this
        process ("" then) or of another (its holder id); None when no live stream holds it."""
        held = self.sessions.leases.holder_alive(sess.id)
        if held is not None and held is not lease:
            return ""
        if (
            sess.held_by
            and (lease is None or sess.held_by != lease.holder)
            and sess.held_until > self.sessions.clock()
        ):
            return sess.held_by
        return None

    # ---- writes ----------------------------------------------------------------------------
    def _ttl(self, sess: Session) -> float:
        return sess.ttl_s or float(self.store.max_ttl_s)

    async def _write(self, w: Write) -> bool | None:
        if self.writer is not None:
            return await self.writer.write(w)
        (ok,) = await self.store.write([w], self.lease_ttl_s)
        return ok

    async def create(self, sess: Session) -> None:
        """Write a new session through the store (CreateSession, restore, fork, a KServe
        sequence's start); ResourceExhausted over the caller's session quota counted there."""
        snap = self.snapshot(sess, meta=True)
        sessions = self.sessions
        # the session quota, counted in the store: N processes do not multiply it
        quota = (sessions.max_per_client or 0) if sess.quota_key is not None else 0
        w = Write(
            sess.id,
            0,
            b"",
            self._ttl(sess),
            create=True,
            quota_key=sess.quota_key,
            quota_max=quota,
        )
        self._encode(w, snap, None)
        ok = await self._write(w)
        if ok is None:
            caller = current()
            assert caller is not None  # a quota key comes from the caller
            where = " across the servers sharing the state store" if self.store.shared else ""
            raise sessions.over_quota(caller, where)
        if not ok:
            raise FailedPrecondition(
                f"session {sid_tag(sess.id)} exists in the state store already; retry"
            )
        sess.fence = 0

    def _encode(
        self, w: Write, snap: Snapshot, result: StepResult | None, sess: Session | None = None
    ) -> None:
        if self.store.shared:
            if sess is None:
                w.snap = to_bytes(snap)
            else:  # a step: the header that does not change is encoded once (snapshot.py)
                encoder = sess.encoder
                if encoder is None:
                    encoder = sess.encoder = StepEncoder()
                w.snap = encoder.encode(snap, sess.initial)  # type: ignore[attr-defined]
            w.resp = result_to_bytes(result) if result is not None else None
        else:  # kept as objects: no encoding (~22 µs per step saved)
            w.value = (snap, result)

    async def write(
        self,
        sess: Session,
        snap: Snapshot,
        lease: Lease | None,
        result: StepResult | None,
        rpos: int,
    ) -> None:
        """Fenced write of ``snap`` (and the step's result, kept for a retry of position
        ``rpos``) as ``sess``'s new state, before its response goes out."""
        snap.meta = self.meta(sess)
        epoch = lease.epoch if lease is not None else sess.fence
        w = Write(sess.id, epoch, b"", self._ttl(sess), None, rpos, lease is not None)
        self._encode(w, snap, result, sess)
        if not await self._write(w):
            if lease is not None:
                self.sessions.leases.lost(lease)
            raise await self.refused(sess, lease)

    async def refused(self, sess: Session, lease: Lease | None) -> Exception:
        """Why the store refused a write of ``sess``, as the store has it now."""
        tag = sid_tag(sess.id)
        dropped = "this result was dropped and the session is unchanged by it"
        try:
            rec = await self.store.load(sess.id)
        except Exception:  # the store went away meanwhile: say what is known
            rec = None
        if rec is None:
            return NotFound(
                f"session {tag} was gone from the state store (closed elsewhere, or expired) "
                f"while this request ran: {dropped}; create a new session"
            )
        if rec.holder and rec.lease_left_s > 0 and (lease is None or rec.holder != lease.holder):
            return FailedPrecondition(
                f"session {tag} is attached to an open stream (on another server process), "
                f"which owns it while it is open: {dropped}. End that stream first (or send "
                "the chunks over it); a stream that died frees the session when its lease "
                f"runs out ({rec.lease_left_s:.1f} s from now)"
            )
        if lease is not None:
            return FailedPrecondition(
                f"this stream's lease on session {tag} ran out (the stream was not renewing "
                f"it) and another stream or server took the session: {dropped}. Open a new "
                "stream to resume the session from where it stands"
            )
        return FailedPrecondition(
            f"session {tag} was advanced by another request (on another stream or server "
            f"process) while this one ran: {dropped}. Retry: it continues from where the "
            "session stands (send the position you expect to detect this)"
        )

    async def delete(self, sess: Session, lease: Lease | None) -> None:
        """Delete ``sess`` from the store, fenced as a write is (refused, saying why, when a
        stream of another process holds it or it moved on)."""
        snap = self.snapshot(sess)
        await self.write(sess, snap, lease, None, -1)
        await self.store.delete(sess.id)

    def _on_bury(self, sess: Session, why: str) -> None:
        if not why.startswith("evicted"):
            return  # an idle expiry here: the store's own TTL decides there; a close deletes
        task = asyncio.get_running_loop().create_task(self.store.delete(sess.id))
        self._deletes.add(task)
        task.add_done_callback(self._deletes.discard)

    async def settle(self) -> None:
        await asyncio.gather(*self._deletes, return_exceptions=True)
        await self.sessions.leases.settle()

    async def close(self, live: list[Lease]) -> None:
        for lease in live:
            self.sessions.leases.release(lease)
        await self.settle()
        await self.store.close()


def check_position(sess: Session, position: int | None) -> StepResult | None:
    """Deduplication by position: None to apply the chunk, or the kept result to send again
    (whatever RPC applied it); FailedPrecondition for any other position."""
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
        f"chunk's result is kept). Continue from position {sess.steps}"
    )


def batch_free(graph: ServedModel, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A session's batch-1 states -> one sequence's states without the batch axis, context
    windows (``context:NAME``) included: they are state (model.py)."""
    return graph.unbatch_state(state)
