"""The runtime's batchers, one per served graph, looked up by (model or version key, role).

Versions come and go while serving (model control), so batchers are made on first use, in
the event loop that submits to them: ``batchers[("lstm@2", "model")]``. A model's name and its
newest version's key find the same graph, hence the same batcher; a drained version's batcher
is stopped and forgotten (``drop``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rnnzoo.errors import RnnzooError

from .batching import Batcher
from .model import ServedModel


class Batchers(dict[tuple[str, str], Batcher]):
    def __init__(self, repo: Any, make: Callable[[ServedModel], Batcher]) -> None:
        super().__init__()
        self.repo = repo
        self.make = make
        self._by_graph: dict[int, Batcher] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start
        for name, entry in repo.entries.items():  # what serves from the start, made now
            for role in entry.graphs:
                self[(name, role)]

    def __missing__(self, key: tuple[str, str]) -> Batcher:
        name, role = key
        graph = self.repo.get(name).graphs[role]  # the repository's error when not served
        batcher = self._by_graph.get(id(graph))
        if batcher is None:
            batcher = self._by_graph[id(graph)] = self.make(graph)
            if self._loop is not None:  # started: start it in the runtime's loop
                try:
                    here = asyncio.get_running_loop()
                except RuntimeError:
                    here = None
                if here is self._loop:
                    batcher.start()
                else:
                    self._loop.call_soon_threadsafe(batcher.start)
        self[key] = batcher
        return batcher

    def get(self, key: tuple[str, str], default: Any = None) -> Any:
        try:
            return self[key]
        except (RnnzooError, KeyError):
            return default

    def values(self) -> list[Batcher]:  # type: ignore[override]
        return list(self._by_graph.values())

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for b in self._by_graph.values():
            b.start()

    async def drop(self, graphs: list[ServedModel], grace_s: float) -> None:
        """Stop the batchers of ``graphs`` (a drained version) and forget them."""
        gone = [self._by_graph.pop(id(g)) for g in graphs if id(g) in self._by_graph]
        for key in [k for k, b in self.items() if b in gone]:
            del self[key]
        await asyncio.gather(*(b.stop(grace_s) for b in gone))
