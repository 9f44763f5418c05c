"""Export any ``nn.Module`` built around ``nn.RNN``/``nn.GRU``/``nn.LSTM`` layers to ONNX.

The one exporter: the zoo's own ``RecurrentNet``/``Seq2Seq`` export
(``rnnzoo.export.onnx_export.export_model``) goes through ``export_graph`` too; its
hand-written ``ScratchRNN`` cores become ``Scan`` loops over their own step.

``export_module(module, example_inputs, path, name=...)``:
1. probes the module eagerly (``rnnzoo.export.probe``): which recurrent layers it calls, in
   which order, with which state; what ONNX cannot take is refused here, naming the layer;
2. infers each input's and output's batch and time axes (or takes them from ``axes=``);
3. lifts every recurrent call's state to graph I/O (``rnnzoo.export.lifting``);
4. decides ``streamable`` by running chunks against the whole sequence
   (``rnnzoo.export.streamability``);
5. traces the lifted module with ``torch.onnx.export(dynamo=True)`` at a batch and time size
   that collide with no fixed dim, so a length baked into the graph shows up in the checks;
6. checks the graph (full checker, strict shape inference, native nodes, every batch/time dim
   symbolic in inputs, outputs and inferred values) and writes it with its contract.

Nothing is written unless every check passes.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import onnx
import torch
from torch import nn

from rnnzoo.contract import TASKS, Contract, StateSpec, TensorSpec
from rnnzoo.errors import InvalidArgument
from rnnzoo.export.contract_builder import BATCH, TIME, exporter_versions
from rnnzoo.export.graph import attach_contract, check_graph, finish_graph, write_model
from rnnzoo.export.guard import doing, guarded
from rnnzoo.export.lifting import (
    TRACING,
    CallSpec,
    FlatModule,
    Plan,
    StateRef,
    check_layer,
    wrap_bare,
)
from rnnzoo.export.native import OPSET, one_thread, quiet_export
from rnnzoo.export.probe import (
    Probe,
    flatten,
    grow,
    grow_inputs,
    infer_input_axes,
    infer_output_axes,
    probe,
    recurrent_layers,
    resize,
    unflatten,
)
from rnnzoo.export.sampling import make_sampler
from rnnzoo.export.scan import expand_scratch_cells
from rnnzoo.export.streamability import check_streamable
from rnnzoo.export.trace_errors import explain

Axes = Mapping[str, Mapping[str, int | None]]
EXPORTER = "rnnzoo.export_module/1"


def _index(t: torch.Tensor, pool: Sequence[torch.Tensor], used: set[int]) -> int | None:
    for i, p in enumerate(pool):
        if p is t and i not in used:
            return i
    return None


def _check_cells(base: Probe) -> None:
    looped = {n: k for n, k in base.cell_calls.items() if k > 1}
    if looped:
        name, k = next(iter(looped.items()))
        raise InvalidArgument(
            f"layer {name!r} is an nn.*Cell called {k} times in one forward (a Python loop over "
            "time): the loop cannot become a dynamic-length ONNX graph. Fix: use the matching "
            "nn.RNN/nn.GRU/nn.LSTM layer, or export the loop body with export_step(step_module, "
            "(x_t, state), path), which loops over time with an ONNX Scan"
        )


def _arg_names(module: nn.Module, args: tuple) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i, _ in enumerate(args):
        p = params[i] if i < len(params) else None
        if p is None or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            names.append(f"input_{i}")
        else:
            names.append(p.name)
    return names


def _leaf_names(module: nn.Module, args: tuple, given: Sequence[str] | None) -> list[str]:
    leaves, _ = flatten(args)
    if given is not None:
        if len(given) != len(leaves):
            raise InvalidArgument(
                f"input_names has {len(given)} names for {len(leaves)} input tensors"
            )
        return list(given)
    names = []
    for arg, base in zip(args, _arg_names(module, args), strict=True):
        n = len(flatten(arg)[0])
        names += [base] if n == 1 else [f"{base}_{j}" for j in range(n)]
    return names


def _plan(base: Probe, leaves: list[torch.Tensor], outs: list[torch.Tensor]):
    """Modes of every call and the state pairs, in call order."""
    calls, refs = [], []
    used_in: set[int] = set()
    used_out: set[int] = set()
    notes = []
    for k, c in enumerate(base.calls):
        mode = "lifted"
        in_idx: list[int | None] = [None] * len(c.hn)
        if c.hx is not None:
            found = [_index(t, leaves, used_in) for t in c.hx]
            if all(i is not None for i in found) and len(found) == len(c.hn):
                mode, in_idx = "given", found
                used_in.update(cast("list[int]", found))  # all found
            elif all(bool((t == 0).all()) for t in c.hx):
                notes.append(f"{c.layer}: zero initial state made in forward, lifted")
            else:
                mode = "internal"
                notes.append(f"{c.layer}: initial state computed from data in forward: not lifted")
        calls.append(CallSpec(c.layer, mode))
        if mode == "internal":
            continue
        for part, h in enumerate(c.hn):
            out_idx = _index(h, outs, used_out)
            if out_idx is not None:
                used_out.add(out_idx)
            refs.append(StateRef(k, part, in_idx[part], out_idx))
    return calls, refs, used_in, used_out, notes


def _fixes_its_lengths(
    module: nn.Module,
    leaves: list[torch.Tensor],
    struct: Any,
    data_in: list[int],
    in_axes: Mapping[int, Mapping[str, int | None]],
) -> bool:
    """Whether the module refuses every grown dim of its inputs but their batch axes."""
    tried = 0
    for i in data_in:
        for d in range(leaves[i].dim()):
            if d == in_axes.get(i, {}).get("batch"):
                continue
            new = list(leaves)
            new[i] = grow(leaves[i], d)
            tried += 1
            try:
                with torch.no_grad():
                    module(*unflatten(new, struct))
                return False
            except Exception:  # the module's own refusal of that size
                continue
    return tried > 0


def _unbatched_calls(
    base: Probe, grown: dict[str, Probe | None], batch: set[int], calls: list[CallSpec]
) -> list[int]:
    """Lifted calls whose batch is not the inputs' batch alone (a module that folds time into
    batch runs its layer at B*L): their state cannot be per-sequence graph I/O."""
    out = []
    for k, c in enumerate(base.calls):
        if calls[k].mode != "lifted":
            continue
        bad = bool(batch) and c.batch not in batch
        for kind, p in grown.items():
            if p is None or len(p.calls) != len(base.calls):
                continue
            want = c.batch + 2 if kind == "batch" and batch else c.batch
            bad = bad or p.calls[k].batch != want
        if bad:
            out.append(k)
    return out


def _export_sizes(module: nn.Module, fixed: set[int]) -> tuple[int, int]:
    taken = {0, 1} | fixed
    for t in [*module.parameters(), *module.buffers()]:
        taken.update(int(d) for d in t.shape)
    B = next(b for b in range(7, 10_000) if b not in taken)  # > any rank: shape vectors
    T = next(t for t in range(B + 1, 10_000) if t not in taken)
    return B, T


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _spec(name: str, t: torch.Tensor, ax: Mapping[str, int | None], meaning: str) -> TensorSpec:
    """The contract's spec of one data tensor; the caller's ``axes`` override inference."""
    b, tm = ax.get("batch"), ax.get("time")
    if b is not None and b == tm:
        raise InvalidArgument(f"{name}: batch and time cannot be the same axis ({b})")
    for kind, a in (("batch", b), ("time", tm)):
        if a is not None and not 0 <= a < t.dim():
            raise InvalidArgument(f"{name}: {kind} axis {a} outside its shape {tuple(t.shape)}")
    shape: list[int | str] = [int(d) for d in t.shape]
    if b is not None:
        shape[b] = BATCH
    if tm is not None:
        shape[tm] = TIME
    return TensorSpec(name, _dtype(t), shape, meaning=meaning, batch_axis=b, time_axis=tm)


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


def build(
    module: nn.Module,
    example_inputs: Any,
    *,
    name: str,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    axes: Axes | None = None,
    task: str = "generic",
    contract_fields: Mapping[str, Any] | None = None,
    source: Mapping[str, str] | None = None,
    meanings: Mapping[str, str] | None = None,
    check_streaming: bool = True,
) -> tuple[FlatModule, Contract, list[torch.Tensor], tuple[int, int]]:
    """The lifted flat module and its contract (nothing exported yet).

    ``contract_fields``: further ``Contract`` fields (labels, vocab, role, group, ...);
    ``meanings``: tensor or state-input name -> its ``meaning`` in the contract.
    Returns (flat, contract, export args at the chosen sizes, (batch, time) export sizes).
    """
    module = wrap_bare(module)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    work = copy.deepcopy(module).eval()
    for p in work.parameters():
        if p.dtype != torch.float32:
            raise InvalidArgument(
                f"parameters are {p.dtype}: ONNX Runtime's CPU recurrent kernels are float32 "
                "only; call module.float() before exporting"
            )
    if task not in TASKS:
        raise InvalidArgument(f"task {task!r} is not one of {list(TASKS)}")
    for layer_name, rnn in recurrent_layers(work).items():  # before any run: name the layer
        check_layer(layer_name, rnn)
    leaves, struct = flatten(args)
    with doing("running the module on the example inputs"):
        base = probe(work, args)
    _check_cells(base)
    if not base.calls:
        raise InvalidArgument(
            f"{type(module).__name__} calls no nn.RNN/nn.GRU/nn.LSTM in its forward: "
            "export_module exports modules built on them; for a hand-written step "
            "(x_t, state) -> (y_t, state) use export_step"
        )
    ops = {check_layer(c.layer, c.rnn) for c in base.calls if not c.cell}
    one_step = all(c.cell for c in base.calls)  # cells called once: the graph is one step
    outs, _ = flatten(base.outputs)
    in_names = _leaf_names(work, args, input_names)
    if output_names is not None and len(output_names) != len(outs):
        raise InvalidArgument(
            f"output_names has {len(output_names)} names for {len(outs)} output tensors"
        )
    out_names = (
        list(output_names)
        if output_names is not None
        else (["y"] if len(outs) == 1 else [f"y_{i}" for i in range(len(outs))])
    )
    calls, refs, used_in, used_out, notes = _plan(base, leaves, outs)
    if outs and used_out == set(range(len(outs))):
        # The forward returns only final states (an encoder's h_n): they are its outputs,
        # and the states get their own lifted outputs beside them.
        for r in refs:
            r.out_leaf = None
        used_out = set()
    data_in = [i for i in range(len(leaves)) if i not in used_in]
    data_out = [i for i in range(len(outs)) if i not in used_out]

    # Axes: the caller's where named, else inferred from the recurrent calls.
    axes = {k: dict(v) for k, v in (axes or {}).items()}
    unknown = set(axes) - set(in_names) - set(out_names)
    if unknown:
        raise InvalidArgument(
            f"axes names {sorted(unknown)}: not among inputs {in_names} or outputs {out_names}"
        )
    given = {
        r.in_leaf: 0 if base.calls[r.call].cell else 1 for r in refs if r.in_leaf is not None
    }  # leaf -> batch axis of the states the forward takes
    to_infer = [i for i in data_in if in_names[i] not in axes]
    with doing("finding the inputs' batch and time axes (growing one dim at a time)"):
        in_axes = infer_input_axes(work, leaves, struct, to_infer, given, base)
    for i in data_in:
        if in_names[i] in axes:
            in_axes[i] = cast("dict[str, int | None]", axes[in_names[i]])  # dicts (above)
    untimed = not any(a.get("time") is not None for a in in_axes.values())
    named_step = untimed and bool(data_in) and all(in_names[i] in axes for i in data_in)
    if named_step and any(r.in_leaf is not None for r in refs):
        # axes= says no input has a time axis (darts' prediction step feeds the layer the
        # last step with its state): each call is one step from the state given
        one_step = True
    if not one_step and untimed and _fixes_its_lengths(work, leaves, struct, data_in, in_axes):
        raise InvalidArgument(
            f"{type(module).__name__} fails in PyTorch whenever a dim of its inputs other than "
            "the batch grows (it fixes its sequence length, e.g. a Linear over the time axis): "
            "the module must run at other sizes than the example's to export with a time axis"
        )
    if not one_step and untimed:
        raise InvalidArgument(
            f"no input of {type(module).__name__} has a time axis that the recurrent layers "
            "read; name it with axes={INPUT_NAME: {'batch': ..., 'time': ...}}"
            + ("" if not named_step else ": axes= gives none and the module keeps no state")
        )
    sizes = {}
    for kind in ("batch", "time"):
        found = {
            int(leaves[i].shape[cast(int, a[kind])])
            for i, a in in_axes.items()
            if a.get(kind) is not None
        }
        if len(found) > 1:
            guessed = [in_names[i] for i in data_in if in_names[i] not in axes]
            raise InvalidArgument(
                f"the inputs' {kind} axes have different lengths {sorted(found)}: one graph "
                f"has one {kind} size; export inputs of different lengths as separate graphs"
                + (
                    f", or name the axes of {guessed} with axes= if they were guessed wrong"
                    if guessed
                    else ""
                )
            )
        sizes[kind] = found
    with doing("growing the inputs' batch and time axes"):
        grown = {k: grow_inputs(work, leaves, struct, in_axes, given, k) for k in ("batch", "time")}
    has_batch = bool(sizes["batch"])
    for k in _unbatched_calls(base, grown, sizes["batch"], calls):
        c = base.calls[k]
        calls[k] = CallSpec(c.layer, "internal")
        used_out -= {r.out_leaf for r in refs if r.call == k}
        refs = [r for r in refs if r.call != k]
        notes.append(
            f"{c.layer}: its batch ({c.batch}) does not follow the inputs' batch "
            f"({sorted(sizes['batch']) or 'none'}) alone (time folded into batch?): its zero "
            "initial state stays inside the graph, not lifted"
        )
    data_out = [i for i in range(len(outs)) if i not in used_out]
    named_out = [k for k, n in enumerate(out_names) if n in axes]
    with doing("finding the outputs' batch and time axes (growing the inputs' axes)"):
        out_axes = infer_output_axes(
            work,
            leaves,
            struct,
            in_axes,
            given,
            outs,
            named={k for k, n in enumerate(out_names) if n in axes},
            axes_given=all(in_names[i] in axes for i in data_in),
            grown=grown,
        )
    for k in named_out:
        out_axes[k] = cast("dict[str, int | None]", axes[out_names[k]])  # dicts (above)

    taken: set[str] = set()
    means = dict(meanings or {})
    inputs = []
    for i in data_in:
        n = _unique(in_names[i], taken)
        inputs.append(_spec(n, leaves[i], in_axes[i], means.get(n, "input")))
    outputs = []
    for k in data_out:
        n = _unique(out_names[k], taken)
        outputs.append(_spec(n, outs[k], out_axes[k], means.get(n, "output")))
    per_layer: dict[str, int] = {}
    for c in calls:
        per_layer[c.layer] = per_layer.get(c.layer, 0) + 1
    seen: dict[str, int] = {}
    states = []
    for ref in refs:
        c = base.calls[ref.call]
        if ref.part == 0:
            seen[c.layer] = seen.get(c.layer, 0) + 1
        prefix = (c.layer or "rnn").replace(".", "_")
        if per_layer[c.layer] > 1:
            prefix += f"_call{seen[c.layer]}"
        letter = "hc"[ref.part]
        h = c.hn[ref.part]
        in_name = in_names[ref.in_leaf] if ref.in_leaf is not None else f"{prefix}_{letter}0"
        out_name = out_names[ref.out_leaf] if ref.out_leaf is not None else f"{prefix}_{letter}n"
        in_name = _unique(in_name, taken)
        meaning = means.get(in_name) or (
            f"{'hidden' if ref.part == 0 else 'cell'} state of {type(c.rnn).__name__} "
            f"{c.layer!r} ({calls[ref.call].mode}), "
            + ("(batch, hidden)" if c.cell else "(layers*directions, batch, hidden)")
        )
        st_shape: list[int | str] = [int(d) for d in h.shape]
        st_axis = 0 if c.cell else 1  # cells: (batch, hidden); layers: (L*D, batch, hidden)
        if has_batch:  # else the module runs at its example's batch only: a fixed size
            st_shape[st_axis] = BATCH
        states.append(
            StateSpec(
                input=in_name,
                output=_unique(out_name, taken),
                dtype=_dtype(h),
                shape=st_shape,
                batch_axis=st_axis,
                init="zeros",
                meaning=meaning,
            )
        )
    plan = Plan(args=struct, data_in=data_in, data_out=data_out, calls=calls, states=refs)
    lengths: dict[str, str] = {}  # packed sequences: the inputs that hold their lengths
    if any(c.packed for c in base.calls):
        for i, spec in zip(data_in, inputs, strict=True):
            if spec.shape == [BATCH] and spec.dtype != "bool":
                lengths[spec.name] = "fraction" if leaves[i].is_floating_point() else "steps"
    int_high = {}
    for i, spec in zip(data_in, inputs, strict=True):
        t = leaves[i]
        if not t.is_floating_point() and t.dtype != torch.bool:
            bounds = [n for ids, n in base.embedded if ids is t]
            int_high[spec.name] = min(bounds) if bounds else int(t.max()) + 1
    extra: dict[str, Any] = {
        "exporter": EXPORTER,
        # native RNN/GRU/LSTM nodes, Scan loops over hand-written cells, or both
        "recurrent_op": "+".join(
            k for k, has in (("native", ops - {"Scan"}), ("Scan", ops & {"Scan"})) if has
        ),
        "lifting": plan.to_dict(),
        "calls": [f"{c.layer}:{c.mode}" for c in calls],
        "int_high": int_high,
    }
    if lengths:  # steps (ints <= T) or fractions of T (speechbrain's relative lengths)
        extra["lengths"] = lengths
    if notes:
        extra["lifting_notes"] = notes
    fields = dict(contract_fields or {})
    fields.setdefault("extra", {})
    fields["extra"] = {**extra, **fields["extra"]}
    src = {f"{k}_version": v for k, v in exporter_versions().items()}
    src["opset"] = str(OPSET)
    src.update(source or {})
    contract = Contract(
        name=name, task=task, inputs=inputs, outputs=outputs, states=states, source=src, **fields
    )
    flat = FlatModule(module, plan)
    streamable, reason = True, "not checked (check_streaming=False)"
    if any(c.packed for c in base.calls):
        streamable, reason = (
            False,
            (
                "it packs its input by the lengths given (pack_padded_sequence -> ONNX "
                "sequence_lens): each call holds whole sequences"
            ),
        )
    elif one_step:
        reason = (
            "a one-step graph (nn.*Cell called once per forward, or no input with a time "
            "axis): each call advances one step from the state given, as "
            "export_step(mode='step') graphs do"
        )
    elif check_streaming:
        with doing("checking whether chunks with the state carried equal the whole sequence"):
            streamable, reason = check_streamable(flat, contract, make_sampler(contract))
    contract = _replace(contract, streamable=streamable, streamable_reason=reason)
    contract.validate(origin=f"contract for {name}")

    # Export sizes that collide with no fixed dim, so a baked length is caught by the checks.
    all_specs: list[TensorSpec | StateSpec] = [*inputs, *outputs, *states]
    fixed = {int(d) for s in all_specs for d in s.shape if isinstance(d, int)}
    B, T = _export_sizes(work, fixed)
    ex_args = []
    for i, spec in zip(data_in, inputs, strict=True):
        t = leaves[i]
        if spec.batch_axis is not None:
            t = resize(t, spec.batch_axis, B)
        if spec.time_axis is not None:
            t = resize(t, spec.time_axis, T)
        ex_args.append(t)
    gen = torch.Generator().manual_seed(0)
    for st in states:
        shape = [B if d == BATCH else int(d) for d in st.shape]
        ex_args.append(0.1 * torch.randn(shape, generator=gen))
    return flat, contract, ex_args, (B, T)


def _replace(contract: Contract, *, streamable: bool, streamable_reason: str) -> Contract:
    extra = {**contract.extra, "streamable_reason": streamable_reason}
    return Contract.from_dict(
        {**_asdict(contract), "streamable": streamable, "extra": extra},
        origin=f"contract for {contract.name}",
    )


def _asdict(contract: Contract) -> dict[str, Any]:
    import json

    return json.loads(contract.to_json())


def _with_derived_dims(contract: Contract, derived: Mapping[str, Mapping[int, str]]) -> Contract:
    d = _asdict(contract)
    for out in d["outputs"]:
        for axis, expr in derived.get(out["name"], {}).items():
            out["shape"][axis] = expr
    return Contract.from_dict(d, origin=f"contract for {contract.name}")


_BOUND_FIX = re.compile(r"(\w+) = Dim\('\w+', min=(\d+)(?:, max=(\d+))?\)")


def _export_refined(flat: nn.Module, args: tuple, dyn: dict[str, Any]) -> Any:
    """torch.export (non-strict); where it asks for a bound on a dim (a convolution without
    padding needs time >= its kernel), once more with that bound. A fix that makes a dim a
    constant is not taken: that error goes to the caller."""
    try:
        return torch.export.export(flat, args, dynamic_shapes=dyn, strict=False)
    except Exception as exc:
        first = exc
    bounds = {
        name: (int(lo), int(hi) if hi else None) for name, lo, hi in _BOUND_FIX.findall(str(first))
    }
    text = str(first)
    if not bounds and "satisfy the generated guard" in text and "specialized" not in text:
        # A guard torch.export cannot prove from the range (darts' out[:, -4:] then .view:
        # "max(0, time - max(0, time - 4)) != 1"), with no fix to suggest: kept as a runtime
        # assert instead. verify runs the graph from the shortest length the module takes.
        return torch.export.export(
            flat,
            args,
            dynamic_shapes=dyn,
            strict=False,
            prefer_deferred_runtime_asserts_over_guards=True,
        )
    if not bounds or any(not n.startswith(("batch", "time")) for n in bounds):
        raise first
    dims = {}
    for spec in dyn["flat"]:
        for d in (spec or {}).values():
            lo, hi = bounds.get(d.__name__, (None, None))
            if lo is not None:
                kw = {"min": lo} if hi is None else {"min": lo, "max": hi}
                dims[d.__name__] = torch.export.Dim(d.__name__, **kw)
    refined = {
        "flat": tuple(
            {a: dims.get(d.__name__, d) for a, d in spec.items()} if spec else spec
            for spec in dyn["flat"]
        )
    }
    return torch.export.export(flat, args, dynamic_shapes=refined, strict=False)


def _size_oblivious() -> Any:
    """What torch.onnx.export's own non-strict capture sets: sizes 0/1 stay symbolic (an
    ``out[:, -4:]`` keeps its ``min(time, 4)`` instead of specialising the time axis)."""
    try:
        from torch.fx.experimental import _config

        return _config.patch(backed_size_oblivious=True)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, TypeError):  # another torch: its default
        return contextlib.nullcontext()


def trace(
    flat: FlatModule,
    contract: Contract,
    ex_args: list[torch.Tensor],
    sizes: tuple[int, int],
    *,
    what: str,
    axes_given: bool = False,
) -> tuple[onnx.ModelProto, Contract]:
    """``torch.onnx.export`` of the flat module, post-processed and checked (nothing written);
    returns it with its contract (an output dim computed from the time size, such as
    ``out[:, -4:]``'s ``min(time, 4)``, replaces the fixed size the probe saw)."""
    # min=2: reshapes of the native nodes' outputs guard on "batch != 1" and "time != 1",
    # which torch.export refuses for a range that holds 1. The graph itself has no bound
    # (ONNX dims are symbolic), and verify runs it at batch 1 and T=1.
    batch = torch.export.Dim(BATCH, min=2)
    time = torch.export.Dim(TIME, min=2)
    dims = {BATCH: batch, TIME: time}
    specs: list[TensorSpec | StateSpec] = [*contract.inputs, *contract.states]
    dyn = []
    for spec in specs:
        d = {i: dims[a] for i, a in enumerate(spec.shape) if isinstance(a, str)}
        dyn.append(d or None)
    in_names = [t.name for t in contract.inputs] + [s.input for s in contract.states]
    out_names = [t.name for t in contract.outputs] + [s.output for s in contract.states]
    try:
        # torch.export in non-strict mode only, then the ONNX translation of its program:
        # torch.onnx.export would fall back to strict (dynamo) tracing, which does not run
        # the Python that captures the recurrent calls, and report that attempt's error.
        with quiet_export(), doing("tracing with torch.export (non-strict)"), _size_oblivious():
            token = TRACING.set(True)
            try:
                ep = _export_refined(flat, tuple(ex_args), {"flat": tuple(dyn)})
            finally:
                TRACING.reset(token)
        with quiet_export(), doing("translating the traced program with torch.onnx.export"):
            prog = torch.onnx.export(
                ep,
                tuple(ex_args),
                dynamo=True,
                input_names=in_names,
                output_names=out_names,
                opset_version=OPSET,
                verbose=False,
                report=False,
            )
    except InvalidArgument:
        raise
    except Exception as exc:  # torch.export's many error classes
        raise explain(exc, what, axes_given=axes_given) from None
    assert prog is not None  # dynamo=True returns the program
    model = prog.model_proto
    with doing("checking the exported graph"):
        n_scan = expand_scratch_cells(model, flat.scratch_cores) if flat.scratch_cores else 0
        derived = finish_graph(model, contract)
        if derived:  # out[:, -4:]: the contract says min(time, 4) where it had 4
            contract = _with_derived_dims(contract, derived)
        problems = check_graph(
            model, contract, native=flat.native, scan=n_scan > 0, stale_sizes=tuple(sizes)
        )
    if problems:
        raise InvalidArgument(
            f"{what}: the exported graph failed its checks:\n  - " + "\n  - ".join(problems)
        )
    return attach_contract(model, contract), contract


def export_graph(
    module: nn.Module,
    example_inputs: Any,
    *,
    name: str,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    axes: Axes | None = None,
    task: str = "generic",
    contract_fields: Mapping[str, Any] | None = None,
    source: Mapping[str, str] | None = None,
    meanings: Mapping[str, str] | None = None,
) -> tuple[Contract, onnx.ModelProto]:
    """The checked graph of ``module`` with its contract in the metadata (nothing written).

    ``export_module`` writes it; the zoo's ``export_model`` builds both halves of a seq2seq
    pair with it before writing either. Keywords as in ``build``.
    """
    with one_thread():  # many small eager runs (probes, the streamability check)
        flat, contract, ex_args, sizes = build(
            module,
            example_inputs,
            name=name,
            input_names=input_names,
            output_names=output_names,
            axes=axes,
            task=task,
            contract_fields=contract_fields,
            source=source,
            meanings=meanings,
        )
        what = f"module {type(module).__name__!r}"
        named = set(axes or {})
        axes_given = all(t.name in named for t in contract.inputs)
        model, contract = trace(flat, contract, ex_args, sizes, what=what, axes_given=axes_given)
        return contract, model


@guarded("export_module")
def export_module(
    module: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    name: str,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    axes: Axes | None = None,
    task: str = "generic",
    labels: Sequence[str] | None = None,
    vocab: Sequence[str] | None = None,
    normalization: Mapping[str, float] | None = None,
    description: str = "",
    source: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Contract:
    """Export ``module`` called as ``module(*example_inputs)`` to ``path``; returns its contract.

    ``example_inputs``: a tuple of positional arguments (tensors, or tuples of tensors such as
    ``(h0, c0)``), or one tensor. ``axes={"x": {"batch": 1, "time": 0}}`` names the batch and
    time axes of an input or output where inference cannot (``None``: no such axis).
    ``input_names``/``output_names`` name the forward's tensors in flattened order (default:
    the forward's parameter names; ``y`` or ``y_0``, ``y_1``, ...). Every recurrent call's
    initial state becomes a graph input and its final state a graph output (see the contract's
    ``states``), unless the forward takes and returns that state itself.
    """
    fields: dict[str, Any] = {"description": description, "extra": dict(extra or {})}
    if labels is not None:
        fields["labels"] = list(labels)
    if vocab is not None:
        fields["vocab"] = list(vocab)
    if normalization is not None:
        fields["normalization"] = {k: float(v) for k, v in normalization.items()}
    contract, model = export_graph(
        module,
        example_inputs,
        name=name,
        input_names=input_names,
        output_names=output_names,
        axes=axes,
        task=task,
        contract_fields=fields,
        source=source,
    )
    write_model(model, path)
    return contract
