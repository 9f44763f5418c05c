"""Give freed memory back to the OS after large requests (glibc ``malloc_trim``).

A request near the limits allocates tens of MB at once (its decoded ids, ORT outputs, the
concatenated slices, the serialized response) in several threads, so in several glibc arenas.
Freed, most of it stays mapped: RSS stayed ~250 MB above its baseline after four concurrent
15 MB-output Infers, and neither ``MALLOC_ARENA_MAX=2`` nor a fixed
``MALLOC_MMAP_THRESHOLD_`` changed that (docs/reliability.md). ``malloc_trim(0)`` releases the
free pages of every arena. ``Trimmer.soon`` schedules one trim a moment after large work
(debounced: the response has been sent and its buffers freed by then), in a thread, because
it walks every arena. A no-op where glibc is not the allocator.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from typing import Any

LARGE_BYTES = 4 << 20  # requests whose outputs reach this schedule a trim
LARGE_STEPS = 1 << 19  # ... and requests of this many steps (tokens, text), even refused ones


def _load() -> Any:  # libc's malloc_trim (a ctypes function), or None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_MALLOC_TRIM = _load()


def trim() -> bool:
    """Release free heap pages to the OS now; False where unavailable."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class Trimmer:
    def __init__(self, enabled: bool = True, delay_s: float = 0.5) -> None:
        self.enabled = enabled and _MALLOC_TRIM is not None
        self.delay_s = delay_s
        self._handle: asyncio.TimerHandle | None = None
        self.trims = 0
        self.seconds = 0.0  # time spent trimming (in a worker thread)

    def soon(self) -> None:
        """Trim ``delay_s`` after the latest call (large work still running pushes it on)."""
        if not self.enabled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the server's loop: nothing to schedule on
            return
        if self._handle is not None:
            self._handle.cancel()
        self._handle = loop.call_later(self.delay_s, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        loop.run_in_executor(None, self._run)

    def _run(self) -> None:
        t0 = time.perf_counter()
        trim()
        self.trims += 1
        self.seconds += time.perf_counter() - t0

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
