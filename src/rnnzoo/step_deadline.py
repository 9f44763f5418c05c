"""Per-step deadlines for calls that stay open across many steps (``Session.step``).

A Stream call has no per-message deadline in gRPC: a step sent to a replica that froze (its
process paused, its host swapping) waited as long as the freeze lasted (issue 21: clients
without a deadline hung for a whole pause behind nginx). ``Watchdog`` cancels a call whose
current step has not been answered by its deadline; the step then fails with
DEADLINE_EXCEEDED, and a session that knows its position resends it (deduplicated by the
server, so a step that did land is answered from the store, never applied twice).

One daemon thread per client, started on first use, sleeping until the nearest deadline: a
step costs a lock and a dict entry, not a timer thread of its own.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable


class Watchdog:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Callable[[], object]]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.fired: set[int] = set()

    def arm(self, seconds: float, cancel: Callable[[], object]) -> int:
        """Call ``cancel()`` in ``seconds`` unless ``disarm``ed first; returns the ticket."""
        ticket = next(self._ids)
        with self._cond:
            self._armed[ticket] = (time.monotonic() + seconds, cancel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rnnzoo-deadline")
                self._thread.daemon = True
                self._thread.start()
            self._cond.notify()
        return ticket

    def disarm(self, ticket: int) -> bool:
        """Stop ``ticket``; True if its deadline had already fired (the call was cancelled)."""
        with self._cond:
            self._armed.pop(ticket, None)
            if ticket in self.fired:
                self.fired.discard(ticket)
                return True
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._armed:
                    self._cond.wait()
                now = time.monotonic()
                due = [t for t, (at, _) in self._armed.items() if at <= now]
                fire = [self._armed.pop(t)[1] for t in due]
                self.fired.update(due)
                if not fire:
                    self._cond.wait(min(at for at, _ in self._armed.values()) - now)
                    continue
            for cancel in fire:
                cancel()
