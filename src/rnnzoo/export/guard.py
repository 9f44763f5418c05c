"""No raw exception out of ``export_module``, ``export_step`` or ``verify_module``.

The exporter runs the user's code many times (a probe, grown inputs, chunked float64 runs,
the trace) and each of those can fail in ways nobody foresaw. ``doing(what)`` marks the stage
in progress and ``in_layer(name)`` the recurrent layer being run (set by the capture), so
that ``guarded`` can turn any exception that is not already an rnnzoo error into an
``InvalidArgument`` that says what rnnzoo was doing, on which layer and source line, what
the error was and what the user can try.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import linecache
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from rnnzoo.errors import InvalidArgument, RnnzooError

F = TypeVar("F", bound=Callable[..., Any])

_stage: ContextVar[str | None] = ContextVar("rnnzoo_export_stage", default=None)
_layer: ContextVar[str | None] = ContextVar("rnnzoo_export_layer", default=None)

# What to try, per stage (the first words of the ``doing`` text).
HINTS = {
    "running the module on the example inputs": (
        "the module fails in PyTorch itself on the example inputs: call it as "
        "module(*example_inputs) and fix that first"
    ),
    "checking whether": (
        "check that the module runs on a few steps at a time with its state passed in; if it "
        "does, this is an rnnzoo bug: report it with the module"
    ),
    "tracing": (
        "write the forward for any batch and time size (x.shape[...] or -1 instead of "
        "numbers, no Python branches on tensor values)"
    ),
}
DEFAULT_HINT = (
    "check that module(*example_inputs) runs in PyTorch at other batch and time sizes; if it "
    "does, this is an rnnzoo bug: report it with the module"
)


def _mark(exc: BaseException, key: str, value: str | None) -> None:
    """Remember on ``exc`` where it was raised (the context is gone when it is caught)."""
    if value is not None and not isinstance(exc, RnnzooError) and not hasattr(exc, key):
        with contextlib.suppress(AttributeError, TypeError):
            setattr(exc, key, value)


@contextlib.contextmanager
def doing(what: str) -> Iterator[None]:
    """Mark the exporter's stage (``what`` reads after "failed while ...")."""
    token = _stage.set(what)
    try:
        yield
    except Exception as exc:
        _mark(exc, "_rnnzoo_stage", what)
        raise
    finally:
        _stage.reset(token)


@contextlib.contextmanager
def in_layer(name: str) -> Iterator[None]:
    """Mark the recurrent layer being run."""
    token = _layer.set(name)
    try:
        yield
    except Exception as exc:
        _mark(exc, "_rnnzoo_layer", name)
        raise
    finally:
        _layer.reset(token)


def describe(exc: BaseException, what: str) -> InvalidArgument:
    """The rnnzoo error for an unexpected ``exc`` raised while ``what`` ran."""
    from rnnzoo.export.trace_errors import user_line

    stage = getattr(exc, "_rnnzoo_stage", None) or _stage.get() or "exporting"
    layer = getattr(exc, "_rnnzoo_layer", None) or _layer.get()
    where = user_line(exc)
    at = ""
    if where:
        src = linecache.getline(where[0], where[1]).strip()
        at = f" at {where[0]}:{where[1]}" + (f" (`{src}`)" if src else "")
    on = f" in recurrent layer {layer!r}" if layer else ""
    hint = next((h for k, h in HINTS.items() if stage.startswith(k)), DEFAULT_HINT)
    msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return InvalidArgument(
        f"{what} failed while {stage}{on}{at}: {type(exc).__name__}: {msg}. Try: {hint}"
    )


def guarded(what: str) -> Callable[[F], F]:
    """Decorate a public entry point: rnnzoo errors pass, anything else is described."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:  # a call that does not match the signature is the caller's, not a failed export
                signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise InvalidArgument(
                    f"{fn.__name__}() was called wrongly: {exc}; its parameters are "
                    f"{fn.__name__}{signature}"
                ) from None
            try:
                return fn(*args, **kwargs)
            except RnnzooError:
                raise
            except Exception as exc:
                err = describe(exc, what)
                raise err from None

        return run  # type: ignore[return-value]

    return wrap
