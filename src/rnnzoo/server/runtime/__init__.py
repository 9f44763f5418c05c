"""Serving core: ONNX Runtime sessions, model repository, session store, batching. No grpc, no torch.

The facade the transport uses is ``Runtime`` (see ``runtime.py``); the parts below it are
``ModelRepository`` (repository.py), ``ServedModel`` (model.py), ``SessionStore``
(sessions.py) and ``Batcher`` (batching.py).
"""

from .repository import ModelInfo, ModelRepository
from .runtime import Runtime, RuntimeOptions, StepResult
from .sessions import SessionInfo

__all__ = [
    "ModelInfo",
    "ModelRepository",
    "Runtime",
    "RuntimeOptions",
    "SessionInfo",
    "StepResult",
]
