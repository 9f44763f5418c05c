"""Session management on the session core: create (or restore from a snapshot), snapshot,
fork, close, reset, describe. One form each, through the state store (every session is in
it); a change of an existing session (reset, close) runs the core's ownership checks and,
for reset, its transaction.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import numpy as np

from rnnzoo.errors import InvalidArgument, NotFound

from .catalog import Catalog
from .core import SessionCore
from .durable import batch_free
from .lease import Lease
from .redact import clip
from .sessions import Session, SessionInfo
from .snapshot import Snapshot
from .stepping import Stepper
from .transaction import Transaction


class SessionOps:
    def __init__(self, core: SessionCore, catalog: Catalog, stepper: Stepper) -> None:
        self.core = core
        self.catalog = catalog
        self.stepper = stepper

    async def create(
        self,
        model: str,
        initial_state: dict[str, np.ndarray] | None = None,
        ttl_s: float | None = None,
        snapshot: Snapshot | None = None,
        sid: str | None = None,
    ) -> Session:
        """A new session, written through the state store. ``ttl_s``: its own idle expiry, at
        most the server's (None: the server's); ``snapshot``: a restore (FailedPrecondition
        if it was taken from another version of the model); ``sid``: a derived id (a KServe
        sequence's)."""
        core = self.core
        core.check()
        sessions, records = core.sessions, core.records
        if snapshot is None:
            model = self.catalog.repo.pin(model)  # its version's key: newer ones never change it
            _, graph = self.catalog.single(model, "a session")
            init = graph.validate_state(initial_state or {})
            sess = sessions.create(model, init, ttl_s, sid)
        else:
            if model and model != snapshot.model:
                raise InvalidArgument(
                    f"the snapshot is of model {snapshot.model!r}, not {clip(model)!r}"
                )
            if initial_state:
                raise InvalidArgument("give a snapshot or an initial_state, not both")
            records.check_snapshot(snapshot)
            sess = sessions.create(snapshot.model, dict(snapshot.initial), ttl_s, sid)
            records.fill(sess, snapshot)
        try:
            await records.create(sess)
        except BaseException:
            with contextlib.suppress(Exception):
                sessions.close(sess.id)
            raise
        return sess

    def restore_snapshot(self, snap: Snapshot) -> Snapshot:
        """A client's snapshot (batch-free states, raw chunks) -> checked, session-ready."""
        self.core.records.check_snapshot(snap)
        _, graph = self.catalog.single(snap.model, "a session")
        if snap.steps < 0:
            raise InvalidArgument(f"snapshot steps must be >= 0, got {snap.steps}")
        snap.state = graph.validate_state(snap.state)
        snap.initial = graph.validate_state(snap.initial)
        # a client's snapshot holds raw arrays here (transport/snapshots.py), Chunks after
        snap.buffer = [graph.validate_chunk(cast(dict[str, Any], c)) for c in snap.buffer]
        if snap.buffer and sum(c.length for c in snap.buffer) != snap.steps:
            raise InvalidArgument("the snapshot's buffered chunks do not add up to its steps")
        return snap

    async def snapshot(
        self, sid: str
    ) -> tuple[Snapshot, dict[str, np.ndarray], dict[str, np.ndarray], list[Any]]:
        """(snapshot, batch-free state, batch-free initial state, buffered chunks' arrays)."""
        self.core.check()
        sess = await self.core.records.fresh(sid)
        snap = self.core.records.snapshot(sess)
        graph = self.catalog.entry(sess.model).graphs["model"]
        return (
            snap,
            batch_free(graph, snap.state),
            batch_free(graph, snap.initial),
            [c.arrays for c in snap.buffer],
        )

    async def fork(self, sid: str, ttl_s: float | None = None) -> Session:
        """A new session with a copy of ``sid``'s state (counts against capacity and quotas
        like any new session)."""
        self.core.check()
        src = await self.core.records.fresh(sid)
        snap = self.core.records.snapshot(src)
        return await self.create(src.model, None, src.ttl_s if ttl_s is None else ttl_s, snap)

    async def close(self, sid: str, lease: Lease | None = None, why: str = "closed") -> None:
        """Close; FailedPrecondition while a stream other than ``lease``'s holder is attached
        (in any process)."""
        core = self.core
        core.check()
        sess = await core.records.fresh(sid) if lease is None else core.sessions.get(sid, False)
        core.not_held(sess, "CloseSession", lease)
        sess.epoch += 1  # a step in flight drops its result
        await core.records.delete(sess, lease)
        with contextlib.suppress(NotFound):  # expired meanwhile: closed all the same
            core.sessions.close(sid, why)

    async def reset(self, sid: str, lease: Lease | None = None) -> None:
        """Back to the initial state; FailedPrecondition while another stream is attached."""
        reset = self.stepper.reset
        async with Transaction(self.core, sid, lease, None, reset, None, "ResetSession", True):
            pass

    def info(self, sid: str) -> SessionInfo:
        self.core.check()
        return self.core.sessions.info(self.core.sessions.get(sid))
