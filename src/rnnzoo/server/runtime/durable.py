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
- store faults (issue 21): every write is a compare-and-set on the epoch *and* on the
  session's position (``Write.steps``; the store applies it only while the stored position is
  the chunk's start), so it cannot land twice or after a newer one. A write the store did not
  confirm (``StoreOutcomeUnknown``: a timeout, a connection lost after sending) marks the
  session *unsettled* at its position and is answered ABORTED naming the position to resend
  from; the session is read back from the store before its next request (``fresh``,
  ``adopt``): a chunk that landed after all is answered from the store (with a position), or,
  without one, refused once with FAILED_PRECONDITION naming where the session stands; a chunk
  that did not land is applied. A record the store no longer has is ``StoreLost`` ("the state
  store no longer has this session").
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable
from typing import Any

import numpy as np

from rnnzoo.errors import Aborted, FailedPrecondition, StoreLost, StoreOutcomeUnknown

from .caller import current
from .catalog import Catalog
from .lease import Lease, process_tag
from .model import Chunk, ServedModel
from .options import StepResult
from .redact import sid_tag
from .repository import ServedEntry
from .sessions import Session, SessionStore
from .snapshot import (
    Snapshot,
    StepEncoder,
    from_bytes,
    initial_size,
    model_hash,
    result_from_bytes,
    result_to_bytes,
    to_bytes,
)
from .store import GroupWriter, Record, StateStore, Write

MAX_UNSETTLED = 100_000


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
        self._ids: dict[str, tuple[ServedEntry, str, dict[str, str]]] = {}
        self._tag = process_tag() + ":"  # this process's holders' ids start with it
        sessions.on_bury = self._on_bury
        # session id -> the position before a write whose outcome is unknown (until read back)
        self.unsettled: dict[str, int] = {}
        # session id -> (that position, where the store had it): it had landed after all
        self.landed: dict[str, tuple[int, int]] = {}

    # ---- snapshots -------------------------------------------------------------------------
    def _identity(self, model: str) -> tuple[str, dict[str, str]]:
        """(graph hash, the contract's source) of ``model``'s served entry, cached per entry:
        a snapshot is made on every step."""
        entry = self.catalog.entry(model)
        got = self._ids.get(model)
        if got is None or got[0] is not entry:
            digest = model_hash([entry.graphs[r] for r in sorted(entry.graphs)])
            source = dict(entry.graphs["model"].contract.source or {})
            got = self._ids[model] = (entry, digest, source)
        return got[1], got[2]

    def model_hash(self, model: str) -> str:
        return self._identity(model)[0]

    def snapshot(
        self,
        sess: Session,
        state: dict[str, np.ndarray] | None = None,
        steps: int | None = None,
        buffer: list[Chunk] | None = None,
        entry: ServedEntry | None = None,
        meta: bool = False,
    ) -> Snapshot:
        """``sess`` as a Snapshot; ``state``/``steps``/``buffer``: a change not committed yet
        (taken as they are: a change's dicts are its own, never changed in place)."""
        got = self._ids.get(sess.model)
        if got is not None and (entry or self.catalog.repo.entries.get(sess.model)) is got[0]:
            digest, source = got[1], got[2]  # (the common case: no look-up that can raise)
        else:
            digest, source = self._identity(sess.model)
        snap = Snapshot(
            sess.model,
            digest,
            sess.steps if steps is None else steps,
            dict(sess.state) if state is None else state,
            sess.initial,
            list(sess.buffer) if buffer is None else buffer,
            source,
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
        held = sessions.leases.holder_alive(sid) is not None
        if held and sid in sessions._live and sid not in self.unsettled:
            return sessions.get(sid)
        await sessions.leases.settle()  # this process's releases in flight land first
        rec = await self.store.load(sid)
        if rec is None:
            sessions.get(sid, touch=False)  # a reason known here first (expired, closed)
            raise self.lost(sid)
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
        before = self.unsettled.pop(rec.sid, None)  # read back: the outcome is known now
        if before is not None and snap.steps != before and rec.rpos == before and last:
            self.landed[rec.sid] = (before, snap.steps)  # it had landed after all

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
        if sess.held_by.startswith(self._tag):
            return None  # a stream of this process, released since (the table here knows)
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
            steps=sess.steps,
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
                w.tail = initial_size(snap)
            else:  # a step: the header that does not change is encoded once (snapshot.py)
                encoder = sess.encoder
                if encoder is None:
                    encoder = sess.encoder = StepEncoder()
                w.snap = encoder.encode(snap, sess.initial)  # type: ignore[attr-defined]
                w.tail = encoder.tail_size(snap)  # type: ignore[attr-defined]
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
        if self.store.shared:
            await self.write_soon(sess, snap, lease, result, rpos)
            return
        w = self._step_write(sess, snap, lease, rpos)
        self._encode(w, snap, result, sess)  # in memory: kept as objects
        (ok,) = await self.store.write([w], self.lease_ttl_s)  # in memory: no unknown outcome
        if not ok:
            raise await self._lost_write(sess, lease, rpos)

    def _step_write(self, sess: Session, snap: Snapshot, lease: Lease | None, rpos: int) -> Write:
        """The fenced ``Write`` of one step of ``sess`` (runs on every step)."""
        meta = sess.meta
        if meta is None:  # the store-only fields never change: made once per session copy
            meta = sess.meta = self.meta(sess)
        snap.meta = meta
        epoch = lease.epoch if lease is not None else sess.fence
        ttl = sess.ttl_s or float(self.store.max_ttl_s)
        w = Write(sess.id, epoch, b"", ttl, None, rpos, lease is not None)
        w.steps = snap.steps
        return w

    def write_soon(
        self,
        sess: Session,
        snap: Snapshot,
        lease: Lease | None,
        result: StepResult | None,
        rpos: int,
    ) -> Awaitable[None]:
        """``write``, queued now (a shared store's: in the group writer's next store call)
        and awaited later: StepMany queues every chunk's write before awaiting any."""
        if not self.store.shared:
            return self.write(sess, snap, lease, result, rpos)
        w = self._step_write(sess, snap, lease, rpos)
        self._encode(w, snap, result, sess)
        before = rpos if rpos >= 0 else sess.steps  # the position before it, read now
        failed = functools.partial(self._failed, sess, lease, rpos, before)
        return self.writer.enqueue_checked(w, failed)  # type: ignore[union-attr]

    async def _failed(
        self,
        sess: Session,
        lease: Lease | None,
        rpos: int,
        before: int,
        outcome: bool | Exception | None,
    ) -> BaseException:
        """What a shared store's write that did not land means (``outcome``: its result, or
        the store's exception; ``before``: the position before it)."""
        if isinstance(outcome, StoreOutcomeUnknown):
            return self._unknown(sess, before, outcome)
        if isinstance(outcome, Exception):
            return outcome
        return await self._lost_write(sess, lease, rpos)

    async def _lost_write(self, sess: Session, lease: Lease | None, rpos: int) -> Exception:
        """A write the store refused: this stream's lease is gone, and why it was refused."""
        if lease is not None:
            self.sessions.leases.lost(lease)
        return await self.refused(sess, lease, rpos)

    def _unknown(self, sess: Session, before: int, exc: StoreOutcomeUnknown) -> Aborted:
        """A write whose outcome is unknown: the session is read back before its next
        request."""
        self.unsettled[sess.id] = before
        if len(self.unsettled) > MAX_UNSETTLED:  # bounded: the oldest are forgotten
            self.unsettled.pop(next(iter(self.unsettled)))
        return Aborted(
            f"session {sid_tag(sess.id)}: {exc}, so whether this request was applied is "
            "unknown. Nothing is lost: the session is read back from the store before its "
            f"next request. Resend it with position={before} (if it was applied you get "
            "its kept result, else it is applied now); without a position, resend it and "
            "the server first says where the session stands if it had landed; it was at "
            f"position {before}"
        )

    async def refused(self, sess: Session, lease: Lease | None, rpos: int = -1) -> Exception:
        """Why the store refused a write of ``sess``, as the store has it now."""
        tag = sid_tag(sess.id)
        dropped = "this result was dropped and the session is unchanged by it"
        try:
            rec = await self.store.load(sess.id)
        except Exception:  # the store went away meanwhile: say what is known
            return FailedPrecondition(
                f"the state store refused a write of session {tag} and cannot be read now: "
                f"{dropped}. Retry once the store is back: the session is read back first"
            )
        if rec is None:
            return self.lost(sess.id, f"; {dropped}")
        epoch = lease.epoch if lease is not None else sess.fence
        if rec.epoch == epoch and rpos >= 0 and rec.steps not in (-1, rpos):
            # the position moved under the same lease: an earlier write landed late
            if rec.rpos == rpos and rec.resp:
                return Aborted(
                    f"session {tag}: this chunk was already applied by an earlier attempt "
                    f"whose answer was lost (the store has the session at position "
                    f"{rec.steps}); {dropped}. Resend it with position={rpos} to get its kept "
                    f"result, or continue from position {rec.steps}"
                )
            return Aborted(
                f"session {tag} is at position {rec.steps} in the state store, not {rpos} as "
                f"this server had it (an earlier write landed late); {dropped}. Continue from "
                f"position {rec.steps}"
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

    def lost(self, sid: str, what: str = "") -> StoreLost:
        """``sid`` is not in the store (any more): its copy here is buried, and the error
        says so (NotFound)."""
        self.unsettled.pop(sid, None)
        self.landed.pop(sid, None)
        why = (
            "not in the state store any more (closed elsewhere, expired, or the state store "
            "no longer has this session: it restarted without persistence, or lost data)"
        )
        self.sessions.gone(sid, why)
        return StoreLost(
            f"session {sid_tag(sid)}: the state store no longer has this session (closed "
            "elsewhere, expired, or the store restarted without persistence or lost data)"
            f"{what}. Create a new session, or restore one from a snapshot you kept"
        )

    def check_position(self, sess: Session, position: int | None) -> StepResult | None:
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
                f"position={at} for its result). The session is at position {now}: continue "
                f"from position {now}"
            )
        return check_position(sess, position)

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
