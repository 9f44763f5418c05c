"""Health follows the state store: NOT_SERVING while it cannot be reached or is broken.

Issue 21: with Redis paused, restarted, emptied or its scripts flushed, and with the DIR
store's disk full or its files deleted, health said SERVING throughout, so load balancers and
orchestrators never acted. ``StoreHealth`` probes the store (``StateStore.ping``: a round
trip, and for the DIR store a small write and a check that its files are still the ones it
opened) every ``every_s`` with a timeout of ``timeout_s``, and calls ``on_change(ok,
why)`` when the answer changes; the server then sets health NOT_SERVING or SERVING again
(with its other conditions: models loaded, the workers' gate open). Nothing else needs a
restart: the stores reconnect (and Redis reloads its scripts) by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from .logs import log

LOG = logging.getLogger("rnnzoo.server")


class StoreHealth:
    def __init__(
        self,
        store,
        on_change: Callable[[bool, str], Awaitable[None]],
        every_s: float = 1.0,
        timeout_s: float = 2.0,
    ) -> None:
        self.store = store
        self.on_change = on_change
        self.every_s, self.timeout_s = every_s, timeout_s
        self.ok = True
        self.why = ""
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def probe(self) -> tuple[bool, str]:
        try:
            await asyncio.wait_for(self.store.ping(), self.timeout_s)
        except TimeoutError:
            return False, (
                f"the state store {self.store.url} did not answer within {self.timeout_s:g} s"
            )
        except Exception as exc:  # the store's own error says what is wrong
            return False, str(exc)
        return True, ""

    async def _loop(self) -> None:
        while True:
            ok, why = await self.probe()
            if ok != self.ok:
                self.ok, self.why = ok, why
                if ok:
                    log(LOG, "state store back: SERVING", store=self.store.url)
                else:
                    log(LOG, "state store failing: NOT_SERVING", logging.ERROR, reason=why)
                await self.on_change(ok, why)
            await asyncio.sleep(self.every_s)
