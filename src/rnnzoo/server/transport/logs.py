"""Structured logs: one JSON object per line, through the standard ``logging`` module.

A record's ``fields`` extra (a dict) becomes top-level keys, e.g.
``{"ts": ..., "level": "info", "logger": "rnnzoo.rpc", "msg": "rpc", "rpc": "Stream",
"session": "...", "model": "lstm", "code": "OK", "ms": 1.2}``.
Servicers add per-call keys (session, model) with ``annotate``; the interceptor that owns
the call writes them in its one line per RPC.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

_call_fields: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "rnnzoo_call_fields", default=None
)


def annotate(**fields: object) -> None:
    """Add keys to the current RPC's log line (no-op outside an RPC)."""
    current = _call_fields.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v not in (None, "")})


def call_fields() -> dict | None:
    """The current RPC's log fields, for a stream that updates them per message (None
    outside an RPC): one lookup per stream instead of one ``annotate`` per message."""
    return _call_fields.get()


def begin_call() -> dict:
    """A fresh field dict for the RPC running in this task; returned for the interceptor."""
    fields: dict = {}
    _call_fields.set(fields)
    return fields


class JsonFormatter(logging.Formatter):
    def __init__(self, fields: dict | None = None) -> None:
        super().__init__()
        self.fields = fields or {}  # on every line (a worker's index)

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.fields,
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: int = logging.INFO, stream=None, fields: dict | None = None) -> None:
    """Send every ``rnnzoo`` logger to ``stream`` (stderr) as JSON lines, with ``fields``
    on each."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(fields))
    root = logging.getLogger("rnnzoo")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def log(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: object) -> None:
    logger.log(level, msg, extra={"fields": fields})


def now_ms() -> float:
    return time.perf_counter() * 1000.0
