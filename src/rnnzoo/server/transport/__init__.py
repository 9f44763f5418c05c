"""gRPC transport: thin grpc.aio servicers, interceptors, health, reflection. The names
below load on first use (``config`` alone is light)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ServerConfig
    from .server import BackgroundServer, RnnzooServer, serve

_WHERE = {
    "BackgroundServer": ".server",
    "RnnzooServer": ".server",
    "ServerConfig": ".config",
    "serve": ".server",
}

__all__ = [
    "BackgroundServer",
    "RnnzooServer",
    "ServerConfig",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
