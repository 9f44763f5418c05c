"""Durable session state: one interface (api.py, split by concern), three stores.

- ``MemoryStore`` (memory.py): no ``--state-store``; this process's memory, lost on restart;
- ``SqliteStore`` (sqlite.py): ``--state-store DIR``, one SQLite file shared on one host;
- ``RedisStore`` (redis.py): ``--state-store redis://...``, shared by hosts.

``GroupWriter`` (group.py) coalesces the writes of one batch into one store call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rnnzoo.errors import InvalidArgument

from .api import (
    DEFAULT_MAX_TTL_S,
    Acquired,
    LeaseStore,
    QuotaStore,
    Record,
    SessionRecords,
    StateStore,
    Write,
    redact,
)
from .group import GroupWriter
from .memory import MemoryStore
from .redis import RedisStore
from .sqlite import SqliteStore

__all__ = [
    "DEFAULT_MAX_TTL_S",
    "Acquired",
    "GroupWriter",
    "LeaseStore",
    "MemoryStore",
    "QuotaStore",
    "Record",
    "RedisStore",
    "SessionRecords",
    "SqliteStore",
    "StateStore",
    "Write",
    "open_store",
    "redact",
]


def open_store(
    spec: str | None,
    max_ttl_s: float = DEFAULT_MAX_TTL_S,
    clock: Callable[[], float] = time.monotonic,
) -> StateStore:
    """``--state-store``: None/"" -> this process's memory (on ``clock``); redis:// or
    rediss:// URL -> Redis; else a directory for the embedded store."""
    if not spec:
        return MemoryStore(max_ttl_s, clock)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(spec, max_ttl_s)
    if "://" in spec:
        raise InvalidArgument(
            f"--state-store {spec.split('://')[0]}://... is not supported; give a directory "
            "(embedded SQLite store) or a redis:// / rediss:// URL"
        )
    return SqliteStore(spec, max_ttl_s)
