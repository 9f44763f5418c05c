"""torch.export's failures translated into one sentence that names the user's source line.

torch.export (under ``torch.onnx.export(dynamo=True)``) fails on Python control flow that
reads tensor values (``if x.sum() > 0:``) and on code that fixes a size the export keeps
symbolic (``x.view(3, 7, -1)``). Its message is long and its traceback is mostly torch's own
frames; ``explain`` keeps the user's line and says what to change.
"""

from __future__ import annotations

import linecache
import os
import re
import traceback

import onnx
import onnxscript
import torch

from rnnzoo.errors import InvalidArgument

_LIBS = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep
    for f in (torch.__file__, traceback.__file__, onnx.__file__, onnxscript.__file__, __file__)
    if f
)
_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')

DATA_DEPENDENT = (
    "data-dependent",
    "GuardOnDataDependentSymNode",
    "Could not guard on data-dependent",
    "Could not extract specialized integer",
    "unbacked",
)
SPECIALIZED = ("Constraints violated", "specialized", "not dynamic", "marked as dynamic")


def _chain(exc: BaseException | None) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _user(path: str) -> bool:
    p = os.path.abspath(path)
    return not p.startswith(_LIBS) and not path.startswith("<")


def user_line(exc: BaseException) -> tuple[str, int] | None:
    """The deepest source line outside torch, the standard library and rnnzoo's exporter."""
    found: tuple[str, int] | None = None
    for e in _chain(exc):
        for frame in traceback.extract_tb(e.__traceback__):
            if _user(frame.filename) and frame.lineno:
                found = (frame.filename, frame.lineno)
        for path, line in _FILE_LINE.findall(str(e)):
            if _user(path):
                found = (path, int(line))
    return found


def explain(exc: BaseException, what: str, *, axes_given: bool = False) -> InvalidArgument:
    """The error to raise instead of ``exc`` (``what``: e.g. "module 'Tagger'").

    ``axes_given``: the caller named every input's axes, so ``axes=`` is not suggested again
    (it could not change the outcome)."""
    text = "\n".join(f"{type(e).__name__}: {e}" for e in _chain(exc))
    where = user_line(exc)
    at = ""
    if where:
        src = linecache.getline(where[0], where[1]).strip()
        at = f" at {where[0]}:{where[1]}" + (f" (`{src}`)" if src else "")
    if "Could not extract specialized integer" in text:
        return InvalidArgument(
            f"{what} cannot be exported: a Python int is read from a tensor's value{at} "
            "(.item(), int(t), or a tensor used as a size, index or dim); keep sizes and dims "
            "as Python ints or x.shape[...], and values as tensor ops"
        )
    if any(k in text for k in DATA_DEPENDENT):
        return InvalidArgument(
            f"{what} cannot be exported: Python control flow depends on tensor values{at}; "
            "compute it with tensor ops (torch.where, masking) or move it out of forward"
        )
    if any(k in text for k in SPECIALIZED):
        return InvalidArgument(
            f"{what} cannot be exported with a symbolic batch and time size: the code fixes "
            f"one of them{at}; write it for any size (x.shape[...] or -1 instead of numbers)"
            + (
                ""
                if axes_given
                else ", or name the axes with axes={...} if they were guessed wrong"
            )
        )
    root = _chain(exc)[-1]  # the tracer's own error, under the exporter's wrappers
    first = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    return InvalidArgument(f"{what} cannot be exported{at}: {first[:300]}")
