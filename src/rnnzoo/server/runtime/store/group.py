"""One store call for the writes of the sessions one batch answered."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .api import StateStore, Write

# what a checked write's failure means: its outcome (False or None: refused; an exception:
# the store's) -> the exception its waiter gets
Failed = Callable[[bool | Exception | None], Awaitable[BaseException]]


class GroupWriter:
    """Coalesce writes: every write enqueued while the previous store call runs (or in the
    same event-loop turn, e.g. the sessions one batch answered) goes in one store call."""

    def __init__(self, store: StateStore, lease_ttl_s: float) -> None:
        self.store, self.lease_ttl_s = store, lease_ttl_s
        # (write, its future, what its failure means: None for a plain write's future)
        self._pending: list[tuple[Write, asyncio.Future[Any], Failed | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._scheduled = False
        self._failing: set[asyncio.Task[None]] = set()

    async def write(self, w: Write) -> bool | None:
        """The write's result (see ``StateStore.write``)."""
        return await self.enqueue(w)

    def enqueue(self, w: Write) -> asyncio.Future[bool | None]:
        """Queue the write without waiting: its result's future."""
        return self._queue(w, None)

    def enqueue_checked(self, w: Write, failed: Failed) -> asyncio.Future[None]:
        """Queue the write without waiting: a future that is None once the store applied it,
        else the exception ``failed`` makes of its outcome (run as a task here). A step's
        write (StepMany queues every chunk's, then awaits them in order: one store call, no
        task per write). Its waiter awaits this future itself: the coroutine per step that
        awaited a plain future and checked its result cost ~1 us of the event loop."""
        return self._queue(w, failed)

    def _queue(self, w: Write, failed: Failed | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((w, fut, failed))
        if not self._scheduled and (self._task is None or self._task.done()):
            self._scheduled = True
            loop.call_soon(self._kick)  # after the other sessions the same batch woke
        return fut

    def _kick(self) -> None:
        self._scheduled = False
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                oks = await self.store.write([w for w, _, _ in batch], self.lease_ttl_s)
            except Exception as exc:
                for _, fut, failed in batch:
                    if fut.done():
                        continue
                    if failed is None:
                        fut.set_exception(exc)
                    else:
                        self._fail(fut, failed(exc))
                continue
            for (_, fut, failed), ok in zip(batch, oks, strict=True):
                if fut.done():
                    continue
                if failed is None:
                    fut.set_result(ok)
                elif ok is True:
                    fut.set_result(None)
                else:
                    self._fail(fut, failed(ok))

    def _fail(self, fut: asyncio.Future[Any], why: Awaitable[BaseException]) -> None:
        """Settle ``fut`` with the exception ``why`` makes (it may read the store: a task)."""
        task = asyncio.get_running_loop().create_task(_settle(fut, why))
        self._failing.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._failing.discard)


async def _settle(fut: asyncio.Future[Any], why: Awaitable[BaseException]) -> None:
    try:
        exc = await why
    except asyncio.CancelledError:  # shutting down: its waiter is cancelled too, not left
        fut.cancel()
        raise
    except Exception as error:  # saying why failed: that error, rather than none
        exc = error
    if not fut.done():
        fut.set_exception(exc)
