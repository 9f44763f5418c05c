"""Serving core: ONNX Runtime sessions, model repository, session store, batching. No grpc, no torch.

The facade the transport uses is ``Runtime`` (see ``runtime.py``); the parts below it are
``ModelRepository`` (repository.py), ``ServedModel`` (model.py), ``SessionStore``
(sessions.py) and ``Batcher`` (batching.py). The names below load on first use: importing a
light part (``options``) loads no ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import RuntimeOptions, StepResult
    from .repository import ModelInfo, ModelRepository
    from .runtime import Runtime
    from .sessions import SessionInfo

_WHERE = {
    "ModelInfo": ".repository",
    "ModelRepository": ".repository",
    "Runtime": ".runtime",
    "RuntimeOptions": ".options",
    "SessionInfo": ".sessions",
    "StepResult": ".options",
}

__all__ = [
    "ModelInfo",
    "ModelRepository",
    "Runtime",
    "RuntimeOptions",
    "SessionInfo",
    "StepResult",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
