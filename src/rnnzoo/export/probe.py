"""An eager probe run of a user's module: which recurrent layers it calls, in what order, how.

``probe(module, args)`` runs the forward once with hooks on every recurrent layer (``nn.RNN``/
``nn.GRU``/``nn.LSTM``, or rnnzoo's hand-written ``ScratchRNN``; one ``Call`` per call, in order: a layer called twice gives two calls), counts the
calls of every ``nn.*Cell`` and records what each ``nn.Embedding`` was fed. It raises clear
errors for what ONNX recurrent nodes cannot take (packed sequences, unbatched input).

``infer_axes`` finds the batch and time axes of the inputs by growing one input dim at a time
and watching which of the recurrent calls' batch/time sizes follow, and those of the outputs by
growing every input's time (then batch) axis and watching which output dims follow.

``flatten``/``unflatten`` turn nested tuples/lists/dicts of tensors into a list of tensors
and back, with a JSON-able structure (stored in the contract, so verify can rebuild the call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from rnnzoo.errors import InvalidArgument
from rnnzoo.export.capture import Recorder, capturing, is_cell, is_layer
from rnnzoo.export.guard import in_layer
from rnnzoo.export.packing import recording_packs
from rnnzoo.models.cells import ScratchRNN

# What the exporter treats as one recurrent layer: native nodes for nn.*, Scan for ScratchRNN.
RECURRENT = (nn.RNNBase, ScratchRNN)

Struct = Any  # "T" | ["seq", kind, [Struct...]] | ["dict", [keys], [Struct...]] | ["const", v]


def flatten(obj: Any) -> tuple[list[torch.Tensor], Struct]:
    """Tensor leaves of nested tuples/lists/dicts, and the structure to rebuild ``obj``."""
    leaves: list[torch.Tensor] = []

    def walk(o: Any) -> Struct:
        if isinstance(o, torch.Tensor):
            leaves.append(o)
            return "T"
        if isinstance(o, nn.utils.rnn.PackedSequence):
            raise InvalidArgument(
                "a PackedSequence among the inputs/outputs: a graph takes and returns tensors. "
                "Fix: pass the padded tensor and its lengths, and pack them inside forward "
                "(pack_padded_sequence, exported as ONNX sequence_lens); return "
                "pad_packed_sequence's padded tensor"
            )
        if isinstance(o, (tuple, list)):
            return ["seq", "list" if isinstance(o, list) else "tuple", [walk(v) for v in o]]
        if isinstance(o, dict):
            return ["dict", [str(k) for k in o], [walk(v) for v in o.values()]]
        if o is None or isinstance(o, (bool, int, float, str)):
            return ["const", o]
        raise InvalidArgument(
            f"cannot export a value of type {type(o).__name__} among the inputs/outputs: use "
            "tensors, tuples, lists, dicts of them, or None"
        )

    return leaves, walk(obj)


def unflatten(leaves: list[torch.Tensor], struct: Struct) -> Any:
    it = iter(leaves)

    def build(s: Struct) -> Any:
        if s == "T":
            return next(it)
        if s[0] == "seq":
            vals = [build(v) for v in s[2]]
            return vals if s[1] == "list" else tuple(vals)
        if s[0] == "dict":
            return {k: build(v) for k, v in zip(s[1], s[2], strict=True)}
        return s[1]

    return build(struct)


@dataclass
class Call:
    """One call of a recurrent layer (or cell) during the probe."""

    layer: str  # qualified name in the module, e.g. "encoder.lstm"
    rnn: nn.Module  # one of RECURRENT, or an nn.*Cell
    batch: int
    time: int  # 1 for a cell (one step)
    hx: tuple[torch.Tensor, ...] | None  # the initial state passed: (h,) or (h, c); None: none
    hn: tuple[torch.Tensor, ...]  # the final state returned
    cell: bool = False  # an nn.RNNCell/GRUCell/LSTMCell: states (batch, hidden)
    packed: bool = False  # fed a PackedSequence (pack_padded_sequence): lengths matter


@dataclass
class Probe:
    calls: list[Call]
    outputs: Any
    cell_calls: dict[str, int] = field(default_factory=dict)
    embedded: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (ids, num_embeddings)

    def sizes(self) -> list[tuple[int, int]]:
        return [(c.batch, c.time) for c in self.calls]


def is_recurrent(m: nn.Module) -> bool:
    return isinstance(m, RECURRENT)


def recurrent_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if is_recurrent(m)}


def captured_names(module: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module of every recurrent layer and cell of ``module``."""
    return {n: m for n, m in module.named_modules() if is_layer(m) or is_cell(m)}


def check_input(name: str, mod: nn.Module, x: Any) -> None:
    """Raise for a layer or cell input that ONNX recurrent nodes cannot take."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        if is_cell(mod) or not isinstance(mod, nn.RNNBase):
            raise InvalidArgument(
                f"layer {name!r} ({type(mod).__name__}) is fed a PackedSequence: only "
                "nn.RNN/nn.GRU/nn.LSTM take one (as ONNX sequence_lens)"
            )
        return
    want = 2 if is_cell(mod) else 3
    if not isinstance(x, torch.Tensor) or x.dim() != want:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        axis = 0 if is_cell(mod) or getattr(mod, "batch_first", True) else 1
        raise InvalidArgument(
            f"layer {name!r} is fed an unbatched input {shape}: export needs a batch axis. "
            f"Fix: pass a batch, e.g. x.unsqueeze({axis}) in the example and in forward"
        )


def state_tuple(h: Any) -> tuple[torch.Tensor, ...] | None:
    if h is None:
        return None
    return tuple(h) if isinstance(h, (tuple, list)) else (h,)


class _Recording(Recorder):
    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.padded: dict[int, int] = {}  # id(packed data) -> padded time length
        self.calls: list[Call] = []
        self.cells: dict[str, int] = {}

    def owns(self, module: nn.Module) -> bool:
        return id(module) in self.names

    def call(self, mod: nn.Module, run: Any, x: Any, hx: Any) -> Any:
        name = self.names[id(mod)]
        check_input(name, mod, x)
        with in_layer(name):
            out = run(x, hx)
        packed = isinstance(x, nn.utils.rnn.PackedSequence)
        if packed:
            if id(x.data) not in self.padded:
                raise InvalidArgument(
                    f"layer {name!r} is fed a PackedSequence that pack_padded_sequence did not "
                    "make in this forward (pack_sequence, or packed outside the module): ONNX "
                    "takes a padded tensor and its lengths. Fix: pass the padded tensor and "
                    "the lengths to forward and pack there with pack_padded_sequence"
                )
            B, T, hn = int(x.batch_sizes[0]), self.padded[id(x.data)], out[1]
        elif is_cell(mod):
            self.cells[name] = self.cells.get(name, 0) + 1
            B, T, hn = int(x.shape[0]), 1, out
        else:
            bt = (x.shape[0], x.shape[1]) if getattr(mod, "batch_first", True) else x.shape[1::-1]
            B, T, hn = int(bt[0]), int(bt[1]), out[1]
        hn_t = cast("tuple[torch.Tensor, ...]", state_tuple(hn))  # a layer returns its state
        self.calls.append(Call(name, mod, B, T, state_tuple(hx), hn_t, is_cell(mod), packed))
        return out


def probe(module: nn.Module, args: tuple) -> Probe:
    """Run ``module(*args)`` once (no grad), recording every recurrent call."""
    embedded: list[tuple[torch.Tensor, int]] = []
    handles = []

    def embed(mod, a):
        if a and isinstance(a[0], torch.Tensor):
            embedded.append((a[0], mod.num_embeddings))

    for m in module.modules():
        if isinstance(m, nn.Embedding):
            handles.append(m.register_forward_pre_hook(embed))
    rec = _Recording({id(m): n for n, m in captured_names(module).items()})
    try:
        with torch.no_grad(), capturing(rec), recording_packs(rec.padded):
            outputs = module(*args)
    finally:
        for h in handles:
            h.remove()
    return Probe(rec.calls, outputs, rec.cells, embedded)


def resize(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``t`` with ``size`` entries along ``axis``: the first ones, then the last one repeated
    (sorted lengths stay sorted), or zeros where the axis is empty (nothing to repeat)."""
    if t.shape[axis] == 0:
        shape = list(t.shape)
        shape[axis] = size
        return t.new_zeros(shape)
    return t.index_select(axis, torch.arange(size).clamp(max=t.shape[axis] - 1))


def grow(t: torch.Tensor, axis: int, by: int = 1) -> torch.Tensor:
    """``t`` with ``by`` more entries along ``axis``."""
    return resize(t, axis, t.shape[axis] + by)


def _try(module: nn.Module, args: tuple) -> Probe | None:
    try:
        return probe(module, args)
    except InvalidArgument:
        raise
    except Exception:  # a shape the module refuses: this dim cannot be grown alone
        return None


def infer_input_axes(
    module: nn.Module,
    leaves: list[torch.Tensor],
    struct: Struct,
    data: list[int],
    states: dict[int, int],
    base: Probe,
) -> dict[int, dict[str, int | None]]:
    """{leaf index: {"batch": axis|None, "time": axis|None}} for every data leaf.

    ``states``: leaf index -> batch axis of every state the forward takes as an argument."""
    ref = base.sizes()

    def kind_of(new: list[torch.Tensor]) -> str | None:
        """Which of the calls' sizes (batch or time, not both) follow the grown inputs."""
        p = _try(module, unflatten(new, struct))
        if p is None and states:  # a batch axis also needs the given states grown
            new = list(new)
            for s, ax in states.items():
                new[s] = grow(leaves[s], ax)
            p = _try(module, unflatten(new, struct))
        if p is None or len(p.calls) != len(ref):
            return None
        got = p.sizes()
        db = any(g[0] != r[0] for g, r in zip(got, ref, strict=True))
        dt = any(g[1] != r[1] for g, r in zip(got, ref, strict=True))
        return None if db == dt else "batch" if db else "time"

    found: dict[int, dict[str, int | None]] = {}
    for i in data:
        hits: dict[str, list[int]] = {"batch": [], "time": []}
        for d in range(leaves[i].dim()):
            new = list(leaves)
            new[i] = grow(leaves[i], d)
            kind = kind_of(new)
            if kind:
                hits[kind].append(d)
        axes: dict[str, int | None] = {}
        for kind, ds in hits.items():
            if len(ds) > 1:
                raise InvalidArgument(
                    f"input {i}: dims {ds} all change the recurrent layers' {kind} size; name "
                    f"its axes with axes={{NAME: {{'batch': ..., 'time': ...}}}}"
                )
            axes[kind] = ds[0] if ds else None
        found[i] = axes
    # Inputs that only grow together (concatenated on features, an empty (B, T, 0) input, a
    # padded batch and its lengths): grow a dim of one with the same-sized dim of every other
    # input (its found axis first), for the axes not found alone.
    for i in data:
        if all(a is not None for a in found[i].values()):
            continue
        hits = {"batch": [], "time": []}
        for d in range(leaves[i].dim()):
            size = leaves[i].shape[d]
            new = list(leaves)
            new[i] = grow(leaves[i], d)
            for j in data:
                if j == i:
                    continue
                known = [a for a in found[j].values() if a is not None]
                dims = [*known, *range(leaves[j].dim())]
                e = next((e for e in dims if leaves[j].shape[e] == size), None)
                if e is not None:
                    new[j] = grow(leaves[j], e)
            kind = kind_of(new)
            if kind:
                hits[kind].append(d)
        for k, ds in hits.items():
            if found[i].get(k) is None and len(ds) == 1 and ds[0] not in found[i].values():
                found[i][k] = ds[0]
    return found


def grow_inputs(
    module: nn.Module,
    leaves: list[torch.Tensor],
    struct: Struct,
    in_axes: dict[int, dict[str, int | None]],
    states: dict[int, int],
    kind: str,
) -> Probe | None:
    """A probe run with every input's ``kind`` axis grown by 2 (None: the module refused)."""
    new = list(leaves)
    for i, ax in in_axes.items():
        if ax.get(kind) is not None:
            new[i] = grow(leaves[i], cast(int, ax[kind]), 2)
    if kind == "batch":
        for s, axis in states.items():
            new[s] = grow(leaves[s], axis, 2)
    return _try(module, unflatten(new, struct))


def infer_output_axes(
    module: nn.Module,
    leaves: list[torch.Tensor],
    struct: Struct,
    in_axes: dict[int, dict[str, int | None]],
    states: dict[int, int],
    base_outputs: list[torch.Tensor],
    named: set[int] = frozenset(),  # type: ignore[assignment]
    axes_given: bool = False,
    grown: dict[str, Probe | None] | None = None,
) -> list[dict[str, int | None]]:
    """Per output leaf: which dim follows the inputs' batch axes and which their time axes.

    ``named``: outputs whose axes the caller gave (not inferred, never refused);
    ``axes_given``: every input's axes were given, so no message suggests ``axes=`` for them.
    """
    changed: dict[str, list[set[int]]] = {}
    for kind in ("batch", "time"):
        if grown is not None and kind in grown:
            p = grown[kind]
        else:
            p = grow_inputs(module, leaves, struct, in_axes, states, kind)
        if p is None:
            fix = (
                "the module must run at other sizes than the example's: write its forward for "
                "any batch and time size"
                if axes_given
                else "name the axes with axes={NAME: {'batch': ..., 'time': ...}}"
            )
            raise InvalidArgument(
                f"the module fails in PyTorch when every input's {kind} axis grows by 2 "
                f"(axes: {in_axes}); {fix}"
            )
        outs, _ = flatten(p.outputs)
        if len(outs) != len(base_outputs):
            raise InvalidArgument(
                f"the module returns {len(outs)} tensors for a longer {kind} but "
                f"{len(base_outputs)} for the example: its outputs must not depend on sizes"
            )
        changed[kind] = [
            {d for d in range(o.dim()) if o.shape[d] != b.shape[d]}
            if o.dim() == b.dim()
            else set(range(o.dim()))
            for o, b in zip(outs, base_outputs, strict=True)
        ]
    result: list[dict[str, int | None]] = []
    for k, b in enumerate(base_outputs):
        if k in named:
            result.append({})
            continue
        cb, ct = changed["batch"][k], changed["time"][k]
        if len(cb) > 1 or len(ct) > 1 or (cb and cb == ct) or b.dim() != len(b.shape):
            raise InvalidArgument(
                f"output {k} (shape {tuple(b.shape)}): cannot tell its batch/time axes apart "
                f"(batch moves dims {sorted(cb)}, time moves {sorted(ct)}); name them with "
                "axes={OUTPUT_NAME: {'batch': ..., 'time': ...}}"
            )
        result.append({"batch": min(cb) if cb else None, "time": min(ct) if ct else None})
    return result
