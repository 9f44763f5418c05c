"""What ``rnnzoo contract init`` settles by running the graph, not by reading its declared dims.

Graphs exported by other tools often declare little: Silero VAD v6 declares its input as
``[?, ?]`` and its state output as ``[?, ?, ?]``, with no dim names at all, so neither the
batch nor the time axis can be read off. ``settle`` runs the graph in ONNX Runtime on zeros
(the constants at their probe values) under each plausible layout and keeps the first that
behaves: it runs at batch 1 and 2, every state output comes back shaped as its input was fed,
and every output's batch dim follows the batch. Then:

- an input's batch and time axes are the layout's; an output's batch axis is the dim that
  went 1 -> 2 with the batch, its time axis the dim that moved with the length (none: one
  value per call);
- the lengths the graph takes: a handful of lengths (1 to 4096) are tried. All of them: no
  chunk rule. Exactly the multiples of M from the smallest that ran: ``{"multiple_of": M}``.
  Otherwise (a graph that takes one window, like Silero's 192..703 samples at 16 kHz):
  ``{"steps": N}``, N the longest length tried that ran.

No torch: the serving install runs it (onnxruntime, numpy).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# tried in this order to find a layout that runs (short first: cheap), then all of them
FIRST_LENGTHS = (2, 16, 64, 512, 256, 1024, 3, 1)
LENGTHS = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
MAX_LAYOUTS = 32  # axis assignments tried (product over inputs and states)

Shape = list  # ints, dim names, or None for an unknown dim


@dataclass
class Layout:
    """Axes the probe found (``None``: no such axis), the lengths that ran, the chunk rule."""

    inputs: dict[str, tuple[int, int | None]]
    states: dict[str, int]
    outputs: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    lengths_ok: list[int] = field(default_factory=list)
    chunk: dict | None = None
    length: int = 2  # a length that ran


def _unknown(shape: Shape) -> list[int]:
    return [i for i, d in enumerate(shape) if not isinstance(d, int)]


def _axis_choices(shape: Shape, batch: str | None) -> list[tuple[int, int | None]]:
    """(batch axis, time axis) candidates for a data input, the declared names' guess first."""
    free = _unknown(shape)
    named = [i for i in free if batch is not None and shape[i] == batch]
    out = []
    for b in named + [i for i in free if i not in named]:
        rest = [i for i in free if i != b]
        out += [(b, t) for t in rest] + [(b, None)]
    return list(dict.fromkeys(out))


def _state_choices(shape: Shape, batch: str | None) -> list[int]:
    free = _unknown(shape)
    named = [i for i in free if batch is not None and shape[i] == batch]
    # ONNX's own layout (layers*directions, batch, hidden) first among unnamed candidates
    rest = sorted((i for i in free if i not in named), key=lambda i: (i != 1, i))
    return named + rest


def _data(dtype: str, shape: Shape, axes: tuple[int, int | None], batch: int, steps: int):
    b, t = axes
    dims = [
        batch if i == b else steps if i == t else d if isinstance(d, int) else 1
        for i, d in enumerate(shape)
    ]
    return np.zeros(dims, dtype=dtype)


def _state(dtype: str, shape: Shape, axis: int, batch: int):
    dims = [batch if i == axis else d if isinstance(d, int) else 1 for i, d in enumerate(shape)]
    return np.zeros(dims, dtype=dtype)


class _Runner:
    def __init__(self, session, data, states, constants):
        self.session = session
        self.data = data  # name -> (dtype, shape)
        self.states = states  # [(input, output, dtype, shape)]
        self.constants = constants  # name -> np.ndarray
        self.names = [o.name for o in session.get_outputs()]
        self.last_error = ""

    def run(self, axes, st_axes, batch: int, steps: int) -> dict[str, np.ndarray] | None:
        feeds = {n: _data(dt, sh, axes[n], batch, steps) for n, (dt, sh) in self.data.items()}
        for si, _, dt, sh in self.states:
            feeds[si] = _state(dt, sh, st_axes[si], batch)
        feeds.update(self.constants)
        try:
            return dict(zip(self.names, self.session.run(self.names, feeds), strict=True))
        except Exception as exc:  # ORT raises its own types; any failure means "not this"
            fed = ", ".join(f"{n} {list(a.shape)}" for n, a in feeds.items())
            self.last_error = f"fed {fed}: {' '.join(str(exc).split())[:300]}"
            return None

    def behaves(self, axes, st_axes, steps: int) -> bool:
        one = self.run(axes, st_axes, 1, steps)
        two = one and self.run(axes, st_axes, 2, steps)
        if not two:
            return False
        for si, so, dt, sh in self.states:
            if two[so].shape != _state(dt, sh, st_axes[si], 2).shape:
                self.last_error = (
                    f"state {si} -> {so}: fed {list(_state(dt, sh, st_axes[si], 2).shape)}, "
                    f"the graph returned {list(two[so].shape)}"
                )
                return False
        return True


def _output_axes(one, two, longer, outputs) -> dict[str, tuple[int | None, int | None]]:
    found = {}
    for name in outputs:
        a, b = one[name].shape, two[name].shape
        moved = [i for i in range(len(a)) if a[i] == 1 and b[i] == 2]
        bx = moved[0] if moved else None
        tx = None
        if longer is not None:
            c = longer[name].shape
            grew = [i for i in range(min(len(a), len(c))) if a[i] != c[i] and i != bx]
            tx = grew[0] if grew else None
        found[name] = (bx, tx)
    return found


def _chunk_rule(ok: list[int]) -> dict | None:
    if not ok or ok == list(LENGTHS):
        return None
    m = math.gcd(*ok)
    multiples = [t for t in LENGTHS if t % m == 0 and t >= min(ok)]
    if m > 1 and len(multiples) > 1 and all(t in ok for t in multiples):
        return {"multiple_of": m}
    return {"steps": max(ok)}


def settle(
    session,
    data: dict[str, tuple[str, Shape]],
    states: list[tuple[str, str, str, Shape]],
    constants: dict[str, np.ndarray],
    outputs: list[str],
    batch: str | None,
) -> tuple[Layout | None, str]:
    """The layout under which ``session`` behaves, or (None, the last failure)."""
    runner = _Runner(session, data, states, constants)
    in_choices = [_axis_choices(sh, batch) for _, sh in data.values()]
    st_choices = [_state_choices(sh, batch) for _, _, _, sh in states]
    fixed = [n for n, c in zip(data, in_choices, strict=True) if not c]
    fixed += [s[0] for s, c in zip(states, st_choices, strict=True) if not c]
    if fixed:
        shapes = {**{n: sh for n, (_, sh) in data.items()}, **{s[0]: s[3] for s in states}}
        return None, (
            f"{fixed[0]!r} has no unknown dim to be the batch (shape {shapes[fixed[0]]}): the "
            "graph was exported for one fixed batch size; rnnzoo batches sessions along a "
            "symbolic batch dim, so re-export it with a dynamic batch axis"
        )
    choices: list[list[Any]] = [*in_choices, *st_choices]
    for combo in itertools.islice(itertools.product(*choices), MAX_LAYOUTS):
        axes: dict[str, tuple[int, int | None]] = dict(zip(data, combo[: len(data)], strict=True))
        st_axes = {s[0]: int(ax) for s, ax in zip(states, combo[len(data) :], strict=True)}
        for steps in FIRST_LENGTHS:
            if not runner.behaves(axes, st_axes, steps):
                continue
            timed = any(t is not None for _, t in axes.values())
            ok = (
                [t for t in LENGTHS if runner.run(axes, st_axes, 1, t) is not None] if timed else []
            )
            one = runner.run(axes, st_axes, 1, steps)
            two = runner.run(axes, st_axes, 2, steps)
            other = next((t for t in ok if t != steps), None)
            longer = runner.run(axes, st_axes, 1, other) if other is not None else None
            layout = Layout(
                inputs=axes,
                states=st_axes,
                outputs=_output_axes(one, two, longer, outputs),
                lengths_ok=ok,
                chunk=_chunk_rule(ok) if timed else None,
                length=steps,
            )
            return layout, ""
    return None, runner.last_error
