"""Tasks: each owns its data, loss, metric, baseline and the metadata a contract needs.

``make_task(name, **params)`` builds one by registry name; modules import lazily so that
listing the zoo never reads a corpus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rnnzoo.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from rnnzoo.models.tasks.base import Task

# registry name -> (module, class)
TASKS: dict[str, tuple[str, str]] = {
    "sines": ("rnnzoo.models.tasks.forecast", "SineForecast"),
    "charlm": ("rnnzoo.models.tasks.charlm", "CharLM"),
    "adding": ("rnnzoo.models.tasks.adding", "AddingProblem"),
    "pytag": ("rnnzoo.models.tasks.pytag", "PyTag"),
    "num2words": ("rnnzoo.models.tasks.num2words", "NumToWords"),
}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise NotFound(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name]
    found: type[Task] = getattr(importlib.import_module(module), cls)
    return found


def make_task(name: str, **params: Any):
    """The task ``name`` built with ``params`` (keyword arguments of its class)."""
    cls = task_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise InvalidArgument(f"task {name!r}: bad parameters {sorted(params)} ({exc})") from None
