"""The next states of a batch, kept whole, so that the same sessions' next batch is fed them
without gathering its rows again.

A batch's next states come back from ORT as one array per state (batch axis B); each session
keeps views of its rows (``ServedModel.split_states``). When the same sessions run again in the
same order, with those very views still their state (StepMany's steady state: the same
sessions in every message, taken in the same order), concatenating the rows rebuilds exactly
the array ORT returned: that array is fed again instead. A session's state is never changed in
place (a step replaces its dict), so the identity of each session's state dict is the check.

Why (issue 23, 2-core AMD EPYC): ``np.concatenate`` of 64 rows of a (2, 1, 128) state takes
12 µs per state input on a quiet host (57 µs measured while the host was busy): ~0.4 µs per
session-step for an LSTM's two states, paid on every batch of StepMany's steady state.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

State = dict[str, np.ndarray]
KEPT = 16  # batches remembered: a StepMany message of 1024 sessions runs 16 batches of 64


class Slabs:
    def __init__(self) -> None:
        # id of a batch's first session state -> (the batch's per-session states, its whole
        # next states); the states are held, so an id is not reused while kept
        self._kept: OrderedDict[int, tuple[list[State], State]] = OrderedDict()
        self._lock = threading.Lock()  # batches may run in executor threads too
        self.reused = 0  # batches fed a kept batch's whole next states (tests and stats)

    def whole(self, states: list[State]) -> State | None:
        """The whole next states of the batch whose rows ``states`` are, in order; None
        when they are not exactly one kept batch's."""
        with self._lock:
            got = self._kept.get(id(states[0]))
        if got is None:
            return None
        rows, whole = got
        if len(rows) != len(states) or any(a is not b for a, b in zip(rows, states, strict=True)):
            return None
        self.reused += 1
        return whole

    def keep(self, rows: list[State], whole: State) -> None:
        """Remember a batch: ``rows`` are views of ``whole``'s rows, in order."""
        with self._lock:
            self._kept[id(rows[0])] = (rows, whole)
            while len(self._kept) > KEPT:
                self._kept.popitem(last=False)
