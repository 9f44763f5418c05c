"""The session core: who may change a session, and the transactions that change it.

Collaborators, passed in: the session table (``SessionStore``: this process's working set,
its leases), the state store's side (``Records``: every session is in the store), the
computations (``Stepper``) and the batchers (a stream's attachment). Every path that changes
a session (rnnzoo.v1 Stream and Infer(advance), KServe sequences, reset, close) runs a
``Transaction`` (transaction.py) made here; create, restore and fork write a new record
(session_ops.py).

Ownership, the same in one process and across processes: a stream holds its session's lease
(in the store); a change from outside that stream (Infer(advance), ResetSession,
CloseSession, a unary KServe request, another stream) is FailedPrecondition naming the
attachment, whichever process holds it.
"""

from __future__ import annotations

from collections.abc import Callable

from rnnzoo.errors import FailedPrecondition

from .batching import Batcher
from .durable import Records
from .lease import Lease
from .redact import sid_tag
from .sessions import Session, SessionStore


class SessionCore:
    def __init__(
        self,
        sessions: SessionStore,
        records: Records,
        batchers: dict[tuple[str, str], Batcher],
        check: Callable[[], None],
    ) -> None:
        self.sessions = sessions
        self.records = records
        self.batchers = batchers
        self.check = check  # Unavailable unless the runtime is serving
        # session id -> (its stream's lease, its batcher, is the stream alive?): a batcher's
        # delay waits only for streams; the renewer renews the leases of live streams
        self.streams: dict[str, tuple[Lease, Batcher | None, Callable[[], bool] | None]] = {}

    # ---- ownership ---------------------------------------------------------------------------
    async def open(self, sid: str, lease: Lease | None, what: str) -> Session:
        """The session a change is about, owned by ``lease`` (or, None, by no live stream):
        read from the store unless this process's live stream holds it."""
        if lease is None:
            sess = await self.records.fresh(sid)
            self.not_held(sess, what, None)  # early, before the lock
            return sess
        if sid in self.records.unsettled:  # a write of this stream's was not confirmed:
            return await self.records.fresh(sid)  # read it back (a KServe stream goes on)
        return self.sessions.get(sid)

    def own(self, sess: Session, lease: Lease | None, what: str) -> None:
        """The authoritative check, inside the session's lock: ``lease`` is still current
        (renewed), or, without one, no live stream holds the session."""
        if lease is None:
            self.not_held(sess, what, None)
        elif not self.sessions.leases.renew(lease):
            raise FailedPrecondition(
                f"this stream's lease on session {sid_tag(sess.id)} ran out (the stream "
                "was not renewing it) and may have moved to another stream; open a new stream "
                "to resume the session"
            )

    def not_held(self, sess: Session, what: str, lease: Lease | None) -> None:
        """FailedPrecondition if a live stream other than ``lease``'s holds the session, in
        this process or another."""
        holder = self.records.held_elsewhere(sess, lease)
        if holder is None:
            return
        if holder == "":
            held = self.sessions.leases.holder_alive(sess.id)
            left = held.expires_at - self.sessions.clock() if held is not None else 0.0
            where = ""
        else:
            left = sess.held_until - self.sessions.clock()
            where = " (on another server process)"
        raise FailedPrecondition(
            f"session {sid_tag(sess.id)} is attached to an open stream{where}, which owns it "
            f"while it is open: {what} is refused. End that stream first (or send the "
            "chunks over it); a stream that died frees the session when its lease runs "
            f"out, at most {self.sessions.leases.ttl_s:g} s after its last renewal "
            f"({left:.1f} s from now)"
        )

    @staticmethod
    def check_epoch(sess: Session, epoch: int) -> None:
        if sess.epoch != epoch:
            raise FailedPrecondition(
                f"session {sid_tag(sess.id)} was reset or closed while this step ran; "
                "its result was dropped, send the chunk again"
            )

    def may_commit(self, sess: Session, epoch: int, lease: Lease | None) -> bool:
        """Still the same session generation, and (fencing) still this stream's lease."""
        return sess.epoch == epoch and (lease is None or self.sessions.leases.current(lease))

    # ---- streams -----------------------------------------------------------------------------
    async def attach(self, sid: str, holder: str, alive: Callable[[], bool] | None = None) -> Lease:
        """Take the session's lease for ``holder`` (a stream) in the store (any process); the
        session is read from the store as it stands. ``alive()``: whether that stream still
        lives (the runtime renews the lease while it does; None: always)."""
        self.check()
        if sid not in self.sessions._live:
            await self.records.fresh(sid)
        self.sessions.get(sid, touch=False)  # NotFound / ownership before the store
        lease, rec = await self.sessions.leases.take(sid, holder)
        self.records.adopt(rec)
        sess = self.sessions.get(sid)
        batcher = self.batchers.get((sess.model, "model"))
        old = self.streams.get(sid)
        if old is not None and old[1] is not None:  # a take-over from a dead stream
            old[1].detach(sid)
        if batcher is not None:
            batcher.attach(sid)
        self.streams[sid] = (lease, batcher, alive)
        return lease

    def detach(self, sid: str, lease: Lease) -> None:
        """The stream ends: its lease is released (in the store by a task in flight)."""
        self.sessions.detach(sid, lease)  # allowed while stopping: streams close then
        entry = self.streams.get(sid)
        if entry is not None and entry[0] is lease:
            del self.streams[sid]
            if entry[1] is not None:
                entry[1].detach(sid)

    async def released(self) -> None:
        """Wait for the store releases in flight: a stream's handler awaits this before it
        ends, so the client's next call (from anywhere) finds the session free."""
        await self.sessions.leases.settle()

    def renew_local(self) -> list[Lease]:
        """Renew the leases of live streams here; returns them (the store renews them too)."""
        renewed = []
        for lease, _, alive in list(self.streams.values()):
            if (alive is None or alive()) and self.sessions.leases.renew(lease):
                renewed.append(lease)
        return renewed
