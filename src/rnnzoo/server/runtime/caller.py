"""Who is calling: set by the transport for each call, read where sessions and quotas are.

The transport's guard (``rnnzoo.server.transport.guard``) authenticates every call, of every
protocol, and sets ``CALLER`` in the call's task before any servicer runs. The runtime reads
it where it matters, so ownership and quotas hold for every servicer alike:

- ``principal``: the authenticated name (bearer token or client certificate), or None when
  the server runs without authentication. With a principal, a session belongs to the
  principal that created it; others get NotFound, exactly as for an unknown id.
- ``key``: what quotas and fair scheduling count by: ``principal:NAME`` with
  authentication, otherwise ``peer:ADDRESS`` (one client connection).

Outside a call (tests, in-process callers) ``CALLER`` is None: no owner checks, no quotas.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    key: str  # quota / fairness key
    principal: str | None = None  # authenticated name; None: authentication is off

    def describe(self) -> str:
        """How messages name this caller."""
        if self.principal is not None:
            return f"principal {self.principal!r}"
        return f"this connection ({self.key.removeprefix('peer:')})"


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "rnnzoo_caller", default=None
)


def current() -> Caller | None:
    return CALLER.get()


def job_key() -> str:
    """The fairness key of the current call ("local" outside a call)."""
    c = CALLER.get()
    return "local" if c is None else c.key
