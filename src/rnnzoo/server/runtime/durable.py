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

Without a store, sessions are per process (as before); deduplication still works in memory.
"""

from __future__ import annotations

import asyncio

import numpy as np

from rnnzoo.errors import FailedPrecondition

from .caller import current
from .redact import sid_tag
from .sessions import Session
from .snapshot import Snapshot, StepEncoder, from_bytes, model_hash, to_bytes
from .store import GroupWriter, StateStore, Write


class Durability:
    def __init__(self, runtime, store: StateStore | None) -> None:
        self.rt = runtime
        self.store = store
        self.writer = GroupWriter(store, runtime.options.lease_ttl_s) if store else None
        self._deletes: set[asyncio.Task] = set()
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
        if held is not None and sid in self.rt.store._live:
            return
        rec = await self.store.load(sid)
        if rec is None:
            self.rt.store.gone(sid, "gone from the state store (closed elsewhere, or expired)")
            return
        self.adopt(sid, from_bytes(rec.snap), rec.epoch, rec.resp, rec.rpos)

    def adopt(self, sid: str, snap: Snapshot, epoch: int, resp: bytes | None, rpos: int):
        m = snap.meta

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
        encoder = sess.encoder
        if encoder is None:
            encoder = sess.encoder = StepEncoder()
        data = encoder.encode(snap, sess.initial)  # type: ignore[attr-defined]
        w = Write(sess.id, epoch, data, self._ttl(sess), resp, rpos, lease is not None)
        if not await self.writer.write(w):
            if lease is not None:
                self.rt.store.leases.lost(lease)
            raise FailedPrecondition(
                f"session {sid_tag(sess.id)} moved on elsewhere while this request ran (its "
                "lease ran out and another stream or server took it): this result was dropped "
                "and the session is unchanged by it. Open a new stream to resume the session "
                "from where it stands"
            )

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
