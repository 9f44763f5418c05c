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
from typing import Any

import torch
from torch import nn

from rnnzoo.errors import InvalidArgument
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
    """One call of a recurrent layer during the probe."""

    layer: str  # qualified name in the module, e.g. "encoder.lstm"
    rnn: nn.Module  # one of RECURRENT
    batch: int
    time: int
    hx: tuple[torch.Tensor, ...] | None  # the initial state passed: (h,) or (h, c); None: none
    hn: tuple[torch.Tensor, ...]  # the final state returned


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


def probe(module: nn.Module, args: tuple) -> Probe:
    """Run ``module(*args)`` once (no grad), recording every recurrent call."""
    calls: list[Call] = []
    cells: dict[str, int] = {}
    embedded: list[tuple[torch.Tensor, int]] = []
    pending: list[tuple[str, nn.Module, int, int, Any]] = []
    handles = []

    def pre(name: str):
        def hook(mod, a, kw):
            x = a[0] if a else kw.get("input")
            if isinstance(x, nn.utils.rnn.PackedSequence):
                raise InvalidArgument(
                    f"layer {name!r} ({type(mod).__name__}) is fed a PackedSequence: ONNX "
                    "recurrent nodes take padded tensors only. Fix: pass the padded tensor "
                    "(pad_packed_sequence/pad_sequence) to the layer and mask or slice the "
                    "outputs by length after it"
                )
            if x.dim() != 3:
                raise InvalidArgument(
                    f"layer {name!r} is fed an unbatched {x.dim()}-D input {tuple(x.shape)}: "
                    "export needs a batch axis. Fix: pass a batch, e.g. x.unsqueeze("
                    f"{0 if mod.batch_first else 1}) in the example and in forward"
                )
            hx = a[1] if len(a) > 1 else kw.get("hx")
            if hx is not None:
                hx = tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)
            bt = (x.shape[0], x.shape[1]) if mod.batch_first else (x.shape[1], x.shape[0])
            pending.append((name, mod, int(bt[0]), int(bt[1]), hx))

        return hook

    def post(mod, a, kw, out):
        name, rnn, B, T, hx = pending.pop()
        hn = out[1]
        hn = tuple(hn) if isinstance(hn, (tuple, list)) else (hn,)
        calls.append(Call(name, rnn, B, T, hx, hn))

    def count(name: str):
        def hook(mod, a):
            cells[name] = cells.get(name, 0) + 1

        return hook

    def embed(mod, a):
        if a and isinstance(a[0], torch.Tensor):
            embedded.append((a[0], mod.num_embeddings))

    for name, m in module.named_modules():
        if is_recurrent(m):
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        elif isinstance(m, nn.RNNCellBase):
            handles.append(m.register_forward_pre_hook(count(name)))
        elif isinstance(m, nn.Embedding):
            handles.append(m.register_forward_pre_hook(embed))
    try:
        with torch.no_grad():
            outputs = module(*args)
    finally:
        for h in handles:
            h.remove()
    return Probe(calls, outputs, cells, embedded)


def grow(t: torch.Tensor, axis: int, by: int = 1) -> torch.Tensor:
    """``t`` with ``by`` more entries along ``axis`` (values repeated from the start)."""
    n = t.shape[axis]
    idx = torch.arange(n + by) % max(n, 1)
    return t.index_select(axis, idx)


def resize(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    return t.index_select(axis, torch.arange(size) % t.shape[axis])


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
    states: list[int],
    base: Probe,
) -> dict[int, dict[str, int | None]]:
    """{leaf index: {"batch": axis|None, "time": axis|None}} for every data leaf."""
    ref = base.sizes()
    found: dict[int, dict[str, int | None]] = {}
    for i in data:
        hits: dict[str, list[int]] = {"batch": [], "time": []}
        for d in range(leaves[i].dim()):
            new = list(leaves)
            new[i] = grow(leaves[i], d)
            p = _try(module, unflatten(new, struct))
            if p is None and states:  # a batch axis also needs the given states grown
                for s in states:
                    new[s] = grow(leaves[s], 1)
                p = _try(module, unflatten(new, struct))
            if p is None or len(p.calls) != len(ref):
                continue
            got = p.sizes()
            db = any(g[0] != r[0] for g, r in zip(got, ref, strict=True))
            dt = any(g[1] != r[1] for g, r in zip(got, ref, strict=True))
            if db != dt:
                hits["batch" if db else "time"].append(d)
        axes: dict[str, int | None] = {}
        for kind, ds in hits.items():
            if len(ds) > 1:
                raise InvalidArgument(
                    f"input {i}: dims {ds} all change the recurrent layers' {kind} size; name "
                    f"its axes with axes={{NAME: {{'batch': ..., 'time': ...}}}}"
                )
            axes[kind] = ds[0] if ds else None
        found[i] = axes
    return found


def infer_output_axes(
    module: nn.Module,
    leaves: list[torch.Tensor],
    struct: Struct,
    in_axes: dict[int, dict[str, int | None]],
    states: list[int],
    base_outputs: list[torch.Tensor],
) -> list[dict[str, int | None]]:
    """Per output leaf: which dim follows the inputs' batch axes and which their time axes."""
    changed: dict[str, list[set[int]]] = {}
    for kind in ("batch", "time"):
        new = list(leaves)
        for i, ax in in_axes.items():
            if ax.get(kind) is not None:
                new[i] = grow(leaves[i], ax[kind], 2)
        if kind == "batch":
            for s in states:
                new[s] = grow(leaves[s], 1, 2)
        p = _try(module, unflatten(new, struct))
        if p is None:
            raise InvalidArgument(
                f"the module fails when every input's {kind} axis grows by 2 (axes found: "
                f"{in_axes}); name the axes with axes={{NAME: {{'batch': ..., 'time': ...}}}}"
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
    result = []
    for k, b in enumerate(base_outputs):
        cb, ct = changed["batch"][k], changed["time"][k]
        if len(cb) > 1 or len(ct) > 1 or (cb and cb == ct) or b.dim() != len(b.shape):
            raise InvalidArgument(
                f"output {k} (shape {tuple(b.shape)}): cannot tell its batch/time axes apart "
                f"(batch moves dims {sorted(cb)}, time moves {sorted(ct)}); name them with "
                "axes={OUTPUT_NAME: {'batch': ..., 'time': ...}}"
            )
        result.append({"batch": min(cb) if cb else None, "time": min(ct) if ct else None})
    return result
