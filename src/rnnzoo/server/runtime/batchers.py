"""The runtime's batchers, one per served graph, looked up by (model or version key, role).

Versions come and go while serving (model control), so a lookup resolves the name through the
repository every time (a model's name follows its newest version; a session's key stays on its
own) and the batcher is the graph's: made on first use, in the event loop that submits to
it. A drained version's batchers are stopped and forgotten (``drop``). Nothing is cached by
name: a name that moved to a newer version never finds the old graph's batcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rnnzoo.errors import RnnzooError

from .batching import Batcher
from .model import ServedModel


class Batchers(dict[tuple[str, str], Batcher]):
    """A mapping in its interface (``batchers[(name, role)]``, ``get``, ``values``); the dict
    itself stays empty, the batchers live in ``_by_graph``."""

    def __init__(self, repo: Any, make: Callable[[ServedModel], Batcher]) -> None:
        super().__init__()
        self.repo = repo
        self.make = make
        # id(graph) -> its batcher; the batcher holds the graph, so an id is never reused
        # while it is here
        self._by_graph: dict[int, Batcher] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start
        for name, entry in repo.entries.items():  # what serves from the start, made now
            for role in entry.graphs:
                self[(name, role)]

    def __getitem__(self, key: tuple[str, str]) -> Batcher:
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
        await asyncio.gather(*(b.stop(grace_s) for b in gone))
