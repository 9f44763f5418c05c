"""The garbage collector set for serving: what start-up made is frozen, and young objects
are collected less often.

Why (issue 23; 2-core AMD EPYC, 256 sessions x 1 step, ``gc.callbacks`` timing every
collection in the server):

- CPython's default thresholds (700, 10, 10) ran full (generation 2) collections of ~36 ms
  each: each walked every object start-up made (the ONNX graphs' metadata, grpc, numpy, the
  protos), which never become garbage. After ``gc.freeze()`` they are out of the
  collector's sight, and a full collection took ~0.6 ms.
- A 256-chunk StepMany message makes a few thousand short-lived objects at once (proto
  wrappers, arrays, futures), so the generation-0 threshold of 700 was crossed hundreds of
  times a second. At 10 000, a message's objects are mostly freed by reference counting
  before a collection runs.
- Both, side by side in one run (4 rounds of StepMany and per-session Streams, 48 s of load
  each): the collector took 2.98 s without this and 0.17 s with it; StepMany's median went
  from 14.9 k to 18.7 k session-steps/s (server CPU 56-70 against 44-61 us per step).

Reference cycles are still collected (every 10 000 net allocations, and fully as the heap
grows); only start-up's objects are exempt, for the life of the process.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # generation 0: net allocations between collections (default 700)


def settle() -> None:
    """Freeze what exists now (call once start-up has loaded the models) and raise the young
    generation's threshold."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
