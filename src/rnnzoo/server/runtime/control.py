"""Model control while serving (Triton's names): ``none``, ``poll``, ``explicit``.

- ``none``: the repository as it was at start, never changed.
- ``poll``: every ``--repository-poll-secs``, the repository folder is scanned again: a new
  version folder is loaded (off the event loop) and, when it loads and its model's
  version_policy serves it, takes new sessions and unversioned requests; a version whose folder
  is gone, or that the policy no longer serves, is retired. A version that fails to load is
  listed UNAVAILABLE with its reason and changes nothing else.
- ``explicit``: ``load(name)`` / ``unload(name)`` (KServe RepositoryModelLoad/Unload); at start
  only ``--load-model`` names are loaded.

A retired version is DRAINING: it refuses new work, and its live sessions run on, each on the
version it started on, until they end or ``--drain-timeout`` passes; then it is dropped and its
sessions' next request says so, naming the version and the timeout. The drain check runs every
``DRAIN_CHECK_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from rnnzoo.errors import FailedPrecondition, InvalidArgument, NotFound

from .repository import DRAINING, ModelRepository, VersionStatus

log = logging.getLogger(__name__)
DRAIN_CHECK_S = 0.5  # a drained version's graphs are freed within this of its last session


class RepositoryControl:
    def __init__(self, runtime: Any) -> None:
        self.rt = runtime
        self.repo: ModelRepository = runtime.repo
        self.options = self.repo.control
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()  # one change at a time (a poll, a load, an unload)
        self.on_change: Callable[[], None] | None = None  # e.g. the model-ready gauge

    @property
    def mode(self) -> str:
        return str(self.options.mode)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._drain_loop()))
        if self.mode == "poll" and self.repo.model_dir is not None:
            self._tasks.append(loop.create_task(self._poll_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    # ---- changes -----------------------------------------------------------------------------
    async def poll(self) -> list[str]:
        """One scan of the repository (what the poll loop runs)."""
        async with self._lock:
            plan = await asyncio.to_thread(self.repo.prepare)
            return self._applied(self.repo.apply(plan, full=True))

    async def load(self, name: str) -> list[str]:
        """Load (or reload) ``name``'s versions as its version_policy says (explicit mode)."""
        self._explicit("RepositoryModelLoad")
        async with self._lock:
            plan = await asyncio.to_thread(self.repo.prepare, {name})
            if name not in plan:
                on_disk = sorted(self.repo.table)
                raise NotFound(
                    f"no model {name!r} in the model repository (models there: {on_disk}); "
                    "put its NAME/VERSION/ folder in the repository, then load it"
                )
            return self._applied(self.repo.apply({name: plan[name]}, full=False))

    async def unload(self, name: str) -> list[str]:
        """Retire every version of ``name`` (explicit mode): live sessions drain."""
        self._explicit("RepositoryModelUnload")
        async with self._lock:
            return self._applied(self.repo.unload(name))

    def _explicit(self, rpc: str) -> None:
        if self.mode != "explicit":
            raise FailedPrecondition(
                f"{rpc} needs --model-control explicit; this server runs with --model-control "
                f"{self.mode}"
                + (
                    " (it follows the repository folder: add or remove version folders instead)"
                    if self.mode == "poll"
                    else " (models load at start only): restart it with --model-control "
                    "explicit to load and unload models while it serves"
                )
            )

    def _applied(self, changes: list[str]) -> list[str]:
        for change in changes:
            log.info("model repository: %s", change, extra={"fields": {"change": change}})
        if changes and self.on_change is not None:
            self.on_change()
        return changes

    # ---- loops -------------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.poll_s)
            try:
                await self.poll()
            except (InvalidArgument, NotFound, FailedPrecondition, OSError) as exc:
                log.warning("model repository scan failed: %s", exc)

    async def _drain_loop(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_CHECK_S)
            await self.drain_once()

    def sessions_on(self, key: str) -> int:
        """Live sessions of this process on a version's key."""
        return sum(1 for s in list(self.rt.sessions._live.values()) if s.model == key)

    async def drain_once(self, now: float | None = None) -> None:
        """Drop each DRAINING version with no live session left, or past the drain timeout."""
        now = time.monotonic() if now is None else now
        for vs in self.repo.draining():
            left = self.sessions_on(vs.key)
            timed_out = now - vs.retired_at >= self.options.drain_timeout_s
            if left and not timed_out:
                continue
            await self._drop(vs, left, timed_out)

    async def _drop(self, vs: VersionStatus, left: int, timed_out: bool) -> None:
        assert vs.state == DRAINING and vs.entry is not None
        graphs = list(vs.entry.graphs.values())
        if timed_out and left:
            why = (
                f"{vs.reason}; {left} live session(s) were cut off by --drain-timeout "
                f"{self.options.drain_timeout_s:g} s"
            )
        else:
            why = f"{vs.reason}; drained"
        self.repo.drop(vs, why)
        await self.rt.batchers.drop(graphs, grace_s=1.0)
        self._applied([f"model {vs.name!r} version {vs.version} dropped ({why})"])
