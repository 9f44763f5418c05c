"""The session-management half of the ``Runtime`` facade: create (or restore from a snapshot),
snapshot, fork, attach/detach a stream (its lease), close, reset, describe. Mixed into
``Runtime``, whose state it uses: ``store`` (SessionStore, leases), ``durable`` (the state
store), ``batchers``, ``_streams`` (live streams' leases); the store-aware ``a*`` coroutines
are the forms the transport calls, the plain methods stay per process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rnnzoo.errors import FailedPrecondition, InvalidArgument

from .durable import batch_free
from .lease import Lease, new_holder
from .redact import clip, sid_tag
from .sessions import SessionInfo
from .snapshot import Snapshot


class SessionOps:
    def create_session(
        self,
        model: str,
        initial_state: dict[str, np.ndarray] | None = None,
        ttl_s: float | None = None,
    ) -> SessionInfo:
        """A new session. ``ttl_s``: its own idle expiry, at most the server's (None: the
        server's)."""
        self._check()
        _, graph = self._single(model, "a session")
        init = graph.validate_state(initial_state or {})
        sess = self.store.create(model, init, ttl_s)
        return self.store.info(sess)

    async def acreate_session(
        self,
        model: str,
        initial_state: dict[str, np.ndarray] | None = None,
        ttl_s: float | None = None,
        snapshot: Snapshot | None = None,
    ) -> SessionInfo:
        """``create_session``, written through the state store; with ``snapshot``, a restore
        (FailedPrecondition if it was taken from another version of the model)."""
        self._check()
        if snapshot is None:
            info = self.create_session(model, initial_state, ttl_s)
            sess = self.store.get(info.id, touch=False)
        else:
            if model and model != snapshot.model:
                raise InvalidArgument(
                    f"the snapshot is of model {snapshot.model!r}, not {clip(model)!r}"
                )
            if initial_state:
                raise InvalidArgument("give a snapshot or an initial_state, not both")
            self.durable.check_snapshot(snapshot)
            sess = self.store.create(snapshot.model, dict(snapshot.initial), ttl_s)
            self.durable.fill(sess, snapshot)
        try:
            await self.durable.create(sess)
        except BaseException:
            self.store.close(sess.id)
            raise
        return self.store.info(sess)

    def restore_snapshot(self, snap: Snapshot) -> Snapshot:
        """A client's snapshot (batch-free states, raw chunks) -> checked, session-ready."""
        self.durable.check_snapshot(snap)
        _, graph = self._single(snap.model, "a session")
        if snap.steps < 0:
            raise InvalidArgument(f"snapshot steps must be >= 0, got {snap.steps}")
        snap.state = graph.validate_state(snap.state)
        snap.initial = graph.validate_state(snap.initial)
        snap.buffer = [graph.validate_chunk(c) for c in snap.buffer]
        if snap.buffer and sum(c.length for c in snap.buffer) != snap.steps:
            raise InvalidArgument("the snapshot's buffered chunks do not add up to its steps")
        return snap

    async def snapshot_session(self, session_id: str) -> tuple[Snapshot, dict, dict, list]:
        """(snapshot, batch-free state, batch-free initial state, buffered chunks' arrays)."""
        self._check()
        await self.durable.fresh(session_id)
        sess = self.store.get(session_id)
        snap = self.durable.snapshot(sess)
        graph = self._entry(sess.model).graphs["model"]
        return (
            snap,
            batch_free(graph, snap.state),
            batch_free(graph, snap.initial),
            [c.arrays for c in snap.buffer],
        )

    async def fork_session(self, session_id: str, ttl_s: float | None = None) -> SessionInfo:
        """A new session with a copy of ``session_id``'s state (counts against capacity and
        quotas like any new session)."""
        self._check()
        await self.durable.fresh(session_id)
        src = self.store.get(session_id)
        snap = self.durable.snapshot(src)
        if ttl_s is None:
            ttl_s = src.ttl_s
        return await self.acreate_session(src.model, None, ttl_s, snapshot=snap)

    async def aattach(
        self, session_id: str, holder: str | None = None, alive: Callable[[], bool] | None = None
    ) -> Lease:
        """``attach``, taking the lease in the state store (any process) when the session is
        there; the session is read from the store as it stands."""
        self._check()
        if self.durable.store is None:
            return self.attach(session_id, holder, alive)
        holder = holder or new_holder()
        if session_id not in self.store._live:
            await self.durable.fresh(session_id)
        self.store.get(session_id, touch=False)  # NotFound / ownership before the store
        lease, rec = await self.store.leases.take(session_id, holder)
        if rec is not None:
            from .snapshot import from_bytes

            self.durable.adopt(session_id, from_bytes(rec.snap), rec.epoch, rec.resp, rec.rpos)
        elif self.store.get(session_id, touch=False).durable:  # the store lost it
            self.store.leases.release(lease)
            raise self.durable.lost(session_id)
        self.store.get(session_id)
        return self._attached(session_id, lease, alive)

    async def aclose_session(self, session_id: str, lease: Lease | None = None) -> None:
        await self.durable.fresh(session_id)
        self.close_session(session_id, lease)
        if self.durable.store is not None:
            await self.durable.store.delete(session_id)

    async def areset_session(self, session_id: str, lease: Lease | None = None) -> None:
        await self.durable.fresh(session_id)
        sess = self.store.get(session_id, touch=False)
        self._not_held(session_id, "ResetSession", lease)
        snap = self.durable.snapshot(sess)
        snap.state, snap.steps, snap.buffer = dict(sess.initial), 0, []
        await self.durable.write(sess, snap, lease, None, -1)
        self.reset_session(session_id, lease)

    def _not_held(self, session_id: str, what: str, lease: Lease | None = None) -> None:
        """FailedPrecondition if a live stream other than ``lease``'s holds the session."""
        held = self.store.leases.holder_alive(session_id)
        if held is not None and held is not lease:
            raise FailedPrecondition(
                f"session {sid_tag(session_id)} is attached to an open stream, which owns it "
                f"while it is open: {what} is refused. End that stream first (or send the "
                "chunks over it); a stream that died frees the session when its lease runs "
                f"out, at most {self.store.leases.ttl_s:g} s after its last renewal "
                f"({held.expires_at - self.store.clock():.1f} s from now)"
            )

    def close_session(self, session_id: str, lease: Lease | None = None) -> None:
        """Close; FailedPrecondition while a stream other than ``lease``'s holder is attached."""
        self._check()
        self.store.get(session_id, touch=False)
        self._not_held(session_id, "CloseSession", lease)
        self.store.close(session_id)

    def reset_session(self, session_id: str, lease: Lease | None = None) -> None:
        """Back to the initial state; FailedPrecondition while another stream is attached."""
        self._check()
        sess = self.store.get(session_id, touch=False)
        self._not_held(session_id, "ResetSession", lease)
        sess = self.store.get(session_id)
        sess.state = dict(sess.initial)
        sess.steps = 0
        sess.buffer = []
        sess.last = None
        sess.epoch += 1

    def attach(
        self, session_id: str, holder: str | None = None, alive: Callable[[], bool] | None = None
    ) -> Lease:
        """Take the session's lease for ``holder`` (a stream). ``alive()`` says whether that
        stream still lives: the runtime renews the lease while it does (None: always)."""
        self._check()
        lease = self.store.attach(session_id, holder or new_holder())
        return self._attached(session_id, lease, alive)

    def _attached(self, session_id: str, lease: Lease, alive) -> Lease:
        batcher = self.batchers.get((self.store.get(session_id, touch=False).model, "model"))
        old = self._streams.get(session_id)
        if old is not None and old[1] is not None:  # a take-over from a dead stream
            old[1].detach(session_id)
        if batcher is not None:
            batcher.attach(session_id)
        self._streams[session_id] = (lease, batcher, alive)
        return lease

    def detach(self, session_id: str, lease: Lease) -> None:
        self.store.detach(session_id, lease)  # allowed while stopping: streams close then
        entry = self._streams.get(session_id)
        if entry is not None and entry[0] is lease:
            del self._streams[session_id]
            if entry[1] is not None:
                entry[1].detach(session_id)

    def session_info(self, session_id: str) -> SessionInfo:
        self._check()
        return self.store.info(self.store.get(session_id))
