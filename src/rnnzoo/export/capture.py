"""Capturing a module's recurrent calls without replacing any of its modules.

For the duration of a ``capturing(recorder)`` block, on the calling thread only, every call
of ``nn.RNN/GRU/LSTM.forward``, ``nn.RNNCell/GRUCell/LSTMCell.forward`` and rnnzoo's
``ScratchRNN.forward`` on a module the recorder ``owns`` goes to ``recorder.call(module,
run, x, hx)`` instead, where ``run(x, hx)`` is the original forward. The user's module keeps
its class, attributes, parameters, ``state_dict`` keys, hooks and ``flatten_parameters``; a
subclass's own forward (pytorch-forecasting's packing ``nn.LSTM`` with ``lengths=``) runs as
written and is captured where it calls ``super().forward``. Every other call, and every call
on another thread, runs the original forward untouched.

The class attributes are swapped while at least one block is open (reference-counted under a
lock) and restored after the last one closes.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from rnnzoo.models.cells import ScratchRNN

LAYERS: tuple[type[nn.Module], ...] = (nn.RNN, nn.GRU, nn.LSTM, ScratchRNN)
CELLS: tuple[type[nn.Module], ...] = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)

_lock = threading.Lock()
_local = threading.local()
_depth = 0
_originals: dict[type, Callable[..., Any]] = {}


class Recorder:
    """What a capture does with each call; ``owns`` says which modules it takes."""

    def owns(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def call(self, module: nn.Module, run: Callable[..., Any], x: Any, hx: Any) -> Any:
        raise NotImplementedError


def _patched(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward(self: nn.Module, input: Any, hx: Any = None, *args: Any, **kwargs: Any) -> Any:
        rec: Recorder | None = getattr(_local, "recorder", None)
        if rec is None or args or kwargs or not rec.owns(self):
            return original(self, input, hx, *args, **kwargs)
        _local.recorder = None  # a recorder's own runs are not captured again
        try:
            return rec.call(self, lambda x, h: original(self, x, h), input, hx)
        finally:
            _local.recorder = rec

    forward.__rnnzoo_capture__ = True  # type: ignore[attr-defined]
    return forward


@contextlib.contextmanager
def capturing(recorder: Recorder) -> Iterator[None]:
    """Route the owned modules' recurrent calls on this thread to ``recorder``."""
    global _depth
    with _lock:
        if _depth == 0:
            for cls in (*LAYERS, *CELLS):
                _originals[cls] = cls.__dict__["forward"]
                cls.forward = _patched(_originals[cls])
        _depth += 1
    previous = getattr(_local, "recorder", None)
    _local.recorder = recorder
    try:
        yield
    finally:
        _local.recorder = previous
        with _lock:
            _depth -= 1
            if _depth == 0:
                for cls, fwd in _originals.items():
                    cls.forward = fwd
                _originals.clear()


def is_layer(m: nn.Module) -> bool:
    return isinstance(m, LAYERS)


def is_cell(m: nn.Module) -> bool:
    return isinstance(m, CELLS)
