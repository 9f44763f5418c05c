"""One store call for the writes of the sessions one batch answered."""

from __future__ import annotations

import asyncio

from .api import StateStore, Write


class GroupWriter:
    """Coalesce writes: every write enqueued while the previous store call runs (or in the
    same event-loop turn, e.g. the sessions one batch answered) goes in one store call."""

    def __init__(self, store: StateStore, lease_ttl_s: float) -> None:
        self.store, self.lease_ttl_s = store, lease_ttl_s
        self._pending: list[tuple[Write, asyncio.Future[bool | None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._scheduled = False

    async def write(self, w: Write) -> bool | None:
        """The write's result (see ``StateStore.write``)."""
        return await self.enqueue(w)

    def enqueue(self, w: Write) -> asyncio.Future[bool | None]:
        """Queue the write without waiting: its result's future (StepMany queues every
        chunk's write, then awaits them in order: one store call, no task per write)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool | None] = loop.create_future()
        self._pending.append((w, fut))
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
                oks = await self.store.write([w for w, _ in batch], self.lease_ttl_s)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), ok in zip(batch, oks, strict=True):
                if not fut.done():
                    fut.set_result(ok)
