"""Step modules: ``(x_t, state) -> (y_t, state)`` exported as a Scan over time, or as one step.

A hand-written cell (a GRU written from ``nn.Parameter``s, a decoder step) advances one step
per call in a Python loop, which no tracer turns into a loop of dynamic length. So the step
itself is traced (at a symbolic batch size) and

- ``mode="scan"`` (default): becomes the body of an ONNX ``Scan`` over a symbolic time axis,
  the mechanism ``rnnzoo.export.scan`` uses for the zoo's hand-written cells. The graph is
  ``(x (batch, time, ...), state) -> (y (batch, time, ...), state)`` and streams like any
  recurrent graph;
- ``mode="step"``: is the graph, ``(x_t (batch, ...), state) -> (y_t (batch, ...), state)``,
  for a caller that loops itself. Its contract says ``streamable``: an output reads only its
  own step and the state given, so the server runs it one step per message (a chunk of length
  1: no time axis), carrying the state, as it runs any streamable graph. Declared
  non-streamable, the server would re-run the buffered "prefix" from the initial state, and
  a prefix of a graph without a time axis is its last step: every output after the first
  would be wrong.

``example_inputs`` is ``(x_t, ..., state, ...)``: the first ``n_inputs`` tensors are per-step
inputs, the rest the state; the step returns ``(y_t, ..., state, ...)`` with the new state
last, in the same order and shapes as the state it was given. Every tensor's batch axis is 0.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper
from torch import nn

from rnnzoo.contract import TASKS, Contract, StateSpec, TensorSpec
from rnnzoo.errors import InvalidArgument
from rnnzoo.export.contract_builder import BATCH, TIME, exporter_versions
from rnnzoo.export.graph import attach_contract, check_graph, finish_graph, write_model
from rnnzoo.export.guard import guarded
from rnnzoo.export.native import OPSET, quiet_export
from rnnzoo.export.probe import Struct, flatten, unflatten
from rnnzoo.export.scan import _prefix_names
from rnnzoo.export.trace_errors import explain

EXPORTER = "rnnzoo.export_step/1"
MODES = ("scan", "step")


class _StepCall(nn.Module):
    """Calls the step with flat tensors: (*x_t, *state) -> (*y_t, *state), or the Scan body's
    order (*state, *x_t) -> (*state, *y_t) when ``body``."""

    def __init__(self, step: nn.Module, struct: Struct, n_in: int, body: bool) -> None:
        super().__init__()
        self.step = step
        self.struct = struct
        self.n_in = n_in
        self.body = body

    def forward(self, *flat: torch.Tensor):
        if self.body:
            n_state = len(flat) - self.n_in
            flat = (*flat[n_state:], *flat[:n_state])
        leaves, _ = flatten(self.step(*unflatten(list(flat), self.struct)))
        n_state = len(flat) - self.n_in
        ys, state = leaves[: len(leaves) - n_state], leaves[len(leaves) - n_state :]
        return (*state, *ys) if self.body else (*ys, *state)


class StepLoop(nn.Module):
    """The eager reference of a Scan export: ``(*x, *state) -> (*y, *state)``, x/y (B, T, ...)."""

    def __init__(self, step: nn.Module, struct: Struct, n_in: int) -> None:
        super().__init__()
        self.call = _StepCall(step, struct, n_in, body=False)
        self.n_in = n_in

    def forward(self, *flat: torch.Tensor):
        xs, state = flat[: self.n_in], list(flat[self.n_in :])
        ys: list[list[torch.Tensor]] = []
        for t in range(xs[0].shape[1]):
            out = self.call(*[x[:, t] for x in xs], *state)
            n_y = len(out) - len(state)
            ys.append(list(out[:n_y]))
            state = list(out[n_y:])
        stacked = [torch.stack([y[i] for y in ys], dim=1) for i in range(len(ys[0]))]
        return (*stacked, *state)


def eager_flat(step: nn.Module, contract: Contract) -> nn.Module:
    """The eager module with the graph's flat signature (for ``verify_module``)."""
    info = contract.extra["step"]
    call = _StepCall(copy.deepcopy(step).eval(), info["args"], info["n_inputs"], body=False)
    if info["mode"] == "step":
        return call
    loop = StepLoop(call.step, info["args"], info["n_inputs"])
    return loop


def _names(step: nn.Module, args: tuple) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(step.forward).parameters.values()]
    except (TypeError, ValueError):
        params = []
    names = []
    for i, a in enumerate(args):
        base = params[i] if i < len(params) else f"input_{i}"
        n = len(flatten(a)[0])
        names += [base] if n == 1 else [f"{base}_{j}" for j in range(n)]
    return names


def _trace_step(call: _StepCall, args: list[torch.Tensor], names: list[str], outs: list[str]):
    batch = torch.export.Dim(BATCH)
    try:
        with quiet_export():
            prog = torch.onnx.export(
                call,
                tuple(args),
                dynamo=True,
                input_names=names,
                output_names=outs,
                dynamic_shapes={"flat": tuple({0: batch} for _ in args)},
                opset_version=OPSET,
                verbose=False,
                report=False,
            )
    except InvalidArgument:
        raise
    except Exception as exc:
        raise explain(exc, f"step module {type(call.step).__name__!r}") from None
    assert prog is not None  # dynamo=True returns the program
    model = prog.model_proto
    if model.functions:
        raise InvalidArgument(
            "the step exported with ONNX local functions, which a Scan body cannot hold"
        )
    return model


def _tensor_type(name: str, like: onnx.ValueInfoProto, dims: list) -> onnx.ValueInfoProto:
    elem = like.type.tensor_type.elem_type
    return helper.make_tensor_value_info(name, elem, dims)


def _scan_model(body_model: onnx.ModelProto, contract: Contract, n_state: int) -> onnx.ModelProto:
    """Outer graph: transpose x to time-major, Scan the step over time, transpose y back."""
    body = body_model.graph
    _prefix_names(body, "step/")
    body.name = "step"
    nodes, n_x = [], len(contract.inputs)
    scan_in = [s.input for s in contract.states]
    for spec in contract.inputs:
        rank = len(spec.shape)
        perm = [1, 0, *range(2, rank)]
        nodes.append(helper.make_node("Transpose", [spec.name], [f"{spec.name}/tm"], perm=perm))
        scan_in.append(f"{spec.name}/tm")
    scan_out = [s.output for s in contract.states] + [f"{t.name}/tm" for t in contract.outputs]
    nodes.append(
        helper.make_node("Scan", scan_in, scan_out, name="scan", body=body, num_scan_inputs=n_x)
    )
    for spec in contract.outputs:
        perm = [1, 0, *range(2, len(spec.shape))]
        nodes.append(helper.make_node("Transpose", [f"{spec.name}/tm"], [spec.name], perm=perm))
    b_in = list(body.input)
    b_out = list(body.output)
    inputs = [
        _tensor_type(s.name, b_in[n_state + i], s.shape) for i, s in enumerate(contract.inputs)
    ]
    inputs += [_tensor_type(s.input, b_in[i], s.shape) for i, s in enumerate(contract.states)]
    outputs = [
        _tensor_type(t.name, b_out[n_state + i], t.shape) for i, t in enumerate(contract.outputs)
    ]
    outputs += [_tensor_type(s.output, b_out[i], s.shape) for i, s in enumerate(contract.states)]
    graph = helper.make_graph(nodes, "step_scan", inputs, outputs)
    model = helper.make_model(graph, opset_imports=list(body_model.opset_import))
    model.ir_version = body_model.ir_version
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


@guarded("export_step")
def export_step(
    step_module: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    name: str,
    n_inputs: int = 1,
    mode: str = "scan",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    state_names: Sequence[tuple[str, str]] | None = None,
    task: str = "generic",
    labels: Sequence[str] | None = None,
    description: str = "",
    source: Mapping[str, str] | None = None,
) -> Contract:
    """Export a step module ``(x_t, state) -> (y_t, state)``; returns the contract written.

    ``n_inputs``: how many of the example's tensors are per-step inputs (the rest is state).
    ``input_names`` name those inputs (default: the forward's parameter names),
    ``output_names`` the per-step outputs (default ``y``, or ``y_0``, ``y_1``, ...),
    ``state_names`` the state pairs (default ``(NAME0, NAMEn)`` from the parameter names).
    """
    if mode not in MODES:
        raise InvalidArgument(f"mode {mode!r} is not one of {list(MODES)}")
    if task not in TASKS:
        raise InvalidArgument(f"task {task!r} is not one of {list(TASKS)}")
    step = copy.deepcopy(step_module).eval()
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    leaves, struct = flatten(args)
    if not 0 < n_inputs < len(leaves):
        raise InvalidArgument(
            f"example_inputs has {len(leaves)} tensors: n_inputs={n_inputs} leaves no state; "
            "pass (x_t, state) with the state after the per-step inputs"
        )
    with torch.no_grad():
        outs, _ = flatten(step(*args))
    n_state = len(leaves) - n_inputs
    x_t, state = leaves[:n_inputs], leaves[n_inputs:]
    new_state = outs[len(outs) - n_state :]
    ys = outs[: len(outs) - n_state]
    if not ys or [tuple(s.shape) for s in new_state] != [tuple(s.shape) for s in state]:
        raise InvalidArgument(
            f"the step returned shapes {[tuple(o.shape) for o in outs]}: it must return "
            f"(y_t, ..., new state) with the new state last, shaped like the state given "
            f"{[tuple(s.shape) for s in state]}"
        )
    names = _names(step, args)
    in_names = list(input_names) if input_names is not None else names[:n_inputs]
    out_names = (
        list(output_names)
        if output_names is not None
        else (["y"] if len(ys) == 1 else [f"y_{i}" for i in range(len(ys))])
    )
    pairs = (
        list(state_names)
        if state_names is not None
        else [(f"{n}0", f"{n}n") for n in names[n_inputs:]]
    )
    if len(in_names) != n_inputs or len(out_names) != len(ys) or len(pairs) != n_state:
        raise InvalidArgument(
            f"names: {len(in_names)} inputs, {len(out_names)} outputs, {len(pairs)} state pairs "
            f"given for {n_inputs} inputs, {len(ys)} outputs, {n_state} states"
        )
    scan = mode == "scan"

    def spec(n: str, t: torch.Tensor) -> TensorSpec:
        shape: list[int | str] = [BATCH, *([TIME] if scan else []), *[int(d) for d in t.shape[1:]]]
        return TensorSpec(
            n,
            str(t.dtype).removeprefix("torch."),
            shape,
            meaning="per-step input",
            batch_axis=0,
            time_axis=1 if scan else None,
        )

    inputs = [spec(n, t) for n, t in zip(in_names, x_t, strict=True)]
    outputs = [
        TensorSpec(
            n,
            str(t.dtype).removeprefix("torch."),
            [BATCH, *([TIME] if scan else []), *[int(d) for d in t.shape[1:]]],
            meaning="per-step output",
            batch_axis=0,
            time_axis=1 if scan else None,
        )
        for n, t in zip(out_names, ys, strict=True)
    ]
    states = [
        StateSpec(
            input=a,
            output=b,
            dtype=str(s.dtype).removeprefix("torch."),
            shape=[BATCH, *[int(d) for d in s.shape[1:]]],
            batch_axis=0,
            init="zeros",
            meaning="state of the step module, (batch, ...)",
        )
        for (a, b), s in zip(pairs, state, strict=True)
    ]
    src = {f"{k}_version": v for k, v in exporter_versions().items()}
    src["opset"] = str(OPSET)
    src.update(source or {})
    reason = (
        "a Scan over the step: each output reads only its own step and the state carried"
        if scan
        else "one-step graph: no time axis; each call advances one step from the state given, "
        "so it streams one step per call with the state carried"
    )
    contract = Contract(
        name=name,
        task=task,
        inputs=inputs,
        outputs=outputs,
        states=states,
        streamable=True,
        labels=list(labels) if labels is not None else None,
        description=description,
        source=src,
        extra={
            "exporter": EXPORTER,
            "recurrent_op": "Scan" if scan else "step",
            "step": {"args": struct, "n_inputs": n_inputs, "mode": mode},
            "streamable_reason": reason,
        },
    )
    contract.validate(origin=f"contract for {name}")

    taken = {1} | {int(d) for t in [*leaves, *outs] for d in t.shape[1:]}
    taken |= {int(d) for p in [*step.parameters(), *step.buffers()] for d in p.shape}
    B = next(b for b in range(7, 10_000) if b not in taken)
    ex = [t.index_select(0, torch.arange(B) % t.shape[0]) for t in leaves]
    if scan:
        call = _StepCall(step, struct, n_inputs, body=True)
        body = _trace_step(
            call,
            [*ex[n_inputs:], *ex[:n_inputs]],
            [f"{p[0]}_t" for p in pairs] + [f"{n}_t" for n in in_names],
            [f"{p[1]}_t" for p in pairs] + [f"{n}_t" for n in out_names],
        )
        model = _scan_model(body, contract, n_state)
    else:
        call = _StepCall(step, struct, n_inputs, body=False)
        model = _trace_step(
            call, ex, [*in_names, *(p[0] for p in pairs)], [*out_names, *(p[1] for p in pairs)]
        )
        finish_graph(model, contract)
    problems = check_graph(model, contract, native=False, scan=scan, stale_sizes=(B,))
    if problems:
        raise InvalidArgument(
            f"step module {type(step_module).__name__!r}: the exported graph failed its "
            "checks:\n  - " + "\n  - ".join(problems)
        )
    write_model(attach_contract(model, contract), path)
    return contract
