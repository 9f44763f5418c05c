"""The one session transaction: every change of a session goes through it.

``async with Transaction(core, sid, lease, position, compute, arg, what) as result:``

1. **own**: read the session (from the state store unless a live stream of this process
   holds it) and check who may change it: the calling stream's lease (renewed; a lease that
   ran out is refused), or, from outside a stream, no live stream of any process;
2. **lock**: the session's FIFO lock (its steps run in order); ownership is checked again.
   A reset (``interrupt``) does not wait: it starts a new generation of the session at once,
   and a step in flight drops its result (FailedPrecondition "reset or closed while this
   step ran");
3. **replay**: a ``position`` already applied yields its kept ``StepResult`` again
   (``replayed``; whatever RPC applied it) and commits nothing;
4. **compute**: ``await compute(sess, arg)`` -> a ``Change`` (new state, steps, buffer and
   the step's result); a reset or close meanwhile drops it;
5. **persist**: ``await result.persist()`` before the response goes out: fenced once more
   and written through the state store with its result (the store refuses it if the session
   moved on: FailedPrecondition saying what happened);
6. **commit** when the block ends without an error (the response went out): this process's
   copy moves on. A caller that does not persist gets it done at the commit.

If the send fails after persist, this process's copy does not move on but the store's has:
a retry adopts the stored state and, with its position, gets the kept result again.

Many sessions at once (StepMany, a session at most once): ``enter_all`` enters their
transactions and ``persist_all`` persists them without a task per transaction, each step
and each check the same, each error in its own place; the caller exits each as usual.

A class rather than an ``asynccontextmanager`` generator: this runs once per streamed message,
and the generator's machinery cost 4.3 µs per use against 1.1 µs for a class (2-core AMD
EPYC).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

import numpy as np

from .lease import Lease
from .model import Chunk
from .options import StepResult
from .repository import ServedEntry
from .sessions import Session

if TYPE_CHECKING:
    from .core import SessionCore

A = TypeVar("A")


@dataclass(slots=True)
class Change:
    """What a transaction computed, not committed yet."""

    state: dict[str, np.ndarray]
    steps: int
    buffer: list[Chunk]
    result: StepResult | None  # None: nothing to replay (a reset)
    rpos: int  # the position the result answers (steps before the chunk); -1: none
    entry: ServedEntry | None = None  # the served entry it ran on (the snapshot's identity)


async def _nothing() -> None:
    return None


class Transaction(Generic[A]):
    __slots__ = (
        "_change",
        "_epoch",
        "_lock",
        "_persisted",
        "_sess",
        "arg",
        "compute",
        "core",
        "interrupt",
        "lease",
        "position",
        "sess",
        "sid",
        "what",
    )

    def __init__(
        self,
        core: SessionCore,
        sid: str,
        lease: Lease | None,
        position: int | None,
        compute: Callable[[Session, A], Awaitable[Change]],
        arg: A,
        what: str,
        interrupt: bool = False,
        sess: Session | None = None,
    ) -> None:
        """``sess``: the session as the caller just looked it up (a stream's, whose copy here
        is the newest: not looked up again)."""
        self.core = core
        self.interrupt = interrupt  # a reset: no waiting for steps in flight, they drop
        self.sess = sess
        self.sid = sid
        self.lease = lease
        self.position = position
        self.compute = compute
        self.arg = arg
        self.what = what
        self._lock: asyncio.Lock | None = None
        self._sess: Session | None = None  # set once a change is computed (None: a replay)
        self._change: Change | None = None
        self._epoch = 0
        self._persisted = False

    async def __aenter__(self) -> StepResult:
        core, lease = self.core, self.lease
        core.check()
        if lease is None:
            sess = await core.open(self.sid, lease, self.what)
        else:  # a stream's own session: the copy here is the newest
            sess = self.sess if self.sess is not None else core.sessions.get(self.sid)
        if self.interrupt:  # a new generation at once: a step in flight drops its result
            core.own(sess, lease, self.what)
            sess.epoch += 1
            return await self._compute()
        lock = sess.lock
        await lock.acquire()
        self._lock = lock
        try:
            return await self._compute()
        except BaseException:
            self._lock = None
            lock.release()
            raise

    async def _compute(self) -> StepResult:
        begun = self._begin()
        if isinstance(begun, StepResult):
            return begun
        sess, computing = begun
        return self._computed(sess, await computing)

    def _begin(self, sess: Session | None = None) -> StepResult | tuple[Session, Awaitable[Change]]:
        """Inside the lock: ownership, then a replay's kept result, or the computation started
        (awaited by the caller: ``_computed``). ``sess``: the session as looked up in this
        same loop turn (``enter_all``: nothing can have closed it since); else looked up."""
        core, lease = self.core, self.lease
        if sess is None:
            sess = core.sessions.get(self.sid)  # closed/expired while waiting?
        # the authoritative check: renews a stream's lease
        if lease is None or not core.sessions.leases.renew(lease):
            core.own(sess, lease, self.what)
        self._epoch = sess.epoch
        kept = core.records.check_position(sess, self.position)
        if kept is not None:
            return StepResult(
                kept.outputs, kept.start, kept.steps_total, kept.revised, True, _nothing
            )
        return sess, self.compute(sess, self.arg)

    def _computed(self, sess: Session, change: Change) -> StepResult:
        if sess.epoch != self._epoch:
            self.core.check_epoch(sess, self._epoch)  # raises
        self._sess, self._change = sess, change
        r = change.result
        if r is None:
            return StepResult({}, 0, change.steps, False, False, self.persist)
        r.persist = self.persist  # handed out with the transaction's persist (cleared at commit)
        return r

    def _unlock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    async def persist(self) -> None:
        """Fence the change again and write it through the state store before its response
        goes out."""
        await self._persist_soon()
        self._persisted = True

    def _persist_soon(self) -> Awaitable[None]:
        """``persist``'s checks now and its write queued (``Records.write_soon``): awaited
        later."""
        sess, change = self._sess, self._change
        assert sess is not None and change is not None
        core, lease = self.core, self.lease
        if sess.epoch != self._epoch:
            core.check_epoch(sess, self._epoch)  # raises
        if lease is None or not core.sessions.leases.current(lease):
            core.own(sess, lease, self.what)  # raises unless no live stream holds it
        snap = core.records.snapshot(sess, change.state, change.steps, change.buffer, change.entry)
        return core.records.write_soon(sess, snap, lease, change.result, change.rpos)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:  # never swallows an exception (so `return` inside is a return)
        lock, self._lock = self._lock, None
        try:
            if exc_type is None and self._sess is not None:
                await self._commit()
        finally:
            if lock is not None:
                lock.release()
        return False

    async def _commit(self) -> None:
        sess, change = self._sess, self._change
        assert sess is not None and change is not None
        if not self._persisted:
            if not self.core.may_commit(sess, self._epoch, self.lease):
                return
            await self.persist()
        sess.state, sess.steps, sess.buffer = change.state, change.steps, change.buffer
        r = change.result
        if r is not None:
            r.persist = None  # the kept result does not hold this transaction
            sess.last = (change.rpos, r)
        else:
            sess.last = None


async def enter_all(txs: Sequence[Transaction[A]]) -> list[StepResult | BaseException]:
    """``__aenter__`` of many sessions' transactions (StepMany: a session at most once), each
    result or error in its place; the entered ones are exited by the caller as usual.

    One pass, without a task per transaction: a stream's transaction whose lock is free is
    locked, checked and its computation started (``compute`` queues its batcher job at once:
    ``Stepper.chunk_soon``); then the computations are awaited in order, so only the first
    wait suspends. A transaction that has to wait (its lock held, no lease, a reset) runs
    its own ``__aenter__`` as a task beside them. The gathered ``__aenter__`` this replaces
    scheduled a task and ~3 loop callbacks per chunk (23 k per 30 messages of 256 chunks,
    2-core AMD EPYC).
    """
    out: list[StepResult | BaseException | None] = [None] * len(txs)
    started: list[tuple[int, Transaction[A], Session, Awaitable[Change]]] = []
    waiting: list[tuple[int, asyncio.Future[StepResult]]] = []
    done = 0  # the started ones awaited so far
    if txs:
        try:
            txs[0].core.check()  # the runtime is serving (one core for all: one check)
        except Exception as exc:  # each chunk gets the error in its place
            return [exc] * len(txs)
    try:
        for i, tx in enumerate(txs):
            sess = tx.sess
            if tx.lease is None or tx.interrupt or sess is None or sess.lock.locked():
                waiting.append((i, asyncio.ensure_future(tx.__aenter__())))
                continue
            try:
                await sess.lock.acquire()  # free: returns at once
                tx._lock = sess.lock
                begun = tx._begin(sess)  # looked up (and touched) by the caller just now
            except Exception as exc:
                tx._unlock()
                out[i] = exc
                continue
            if isinstance(begun, StepResult):
                out[i] = begun
            else:
                started.append((i, tx, *begun))
        while done < len(started):
            i, tx, sess, computing = started[done]
            done += 1
            try:
                out[i] = tx._computed(sess, await computing)
            except Exception as exc:
                tx._unlock()
                out[i] = exc
        for i, fut in waiting:
            try:
                out[i] = await fut
            except Exception as exc:
                out[i] = exc
    except BaseException:  # cancelled: nothing stays locked
        for _, _, _, computing in started[done:]:
            if asyncio.iscoroutine(computing):
                computing.close()
            elif isinstance(computing, asyncio.Future):
                computing.cancel()
        for i, tx in enumerate(txs):
            if not isinstance(out[i], BaseException):
                tx._unlock()
        for _, fut in waiting:
            fut.cancel()
        raise
    return out  # type: ignore[return-value]


async def persist_all(txs: Sequence[Transaction[A]]) -> list[BaseException | None]:
    """``persist`` of many entered transactions (StepMany), each error in its place: every
    write is queued first (a shared store's in one store call: the group writer's) and then
    awaited in order, without a task per write. A replay has nothing to write."""
    out: list[BaseException | None] = [None] * len(txs)
    queued: list[tuple[int, Transaction[A], Awaitable[None]]] = []
    for i, tx in enumerate(txs):
        if tx._sess is None or tx._persisted:
            continue
        try:
            queued.append((i, tx, tx._persist_soon()))
        except Exception as exc:
            out[i] = exc
    for k, (i, tx, writing) in enumerate(queued):
        try:
            await writing
        except Exception as exc:
            out[i] = exc
        except BaseException:  # cancelled: the writes not awaited are left to the store
            for _, _, rest in queued[k + 1 :]:
                if asyncio.iscoroutine(rest):
                    rest.close()
            raise
        else:
            tx._persisted = True
    return out
