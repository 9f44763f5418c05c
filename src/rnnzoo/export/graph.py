"""What every exported graph goes through before it is written: one set of checks, one writer.

``export_module`` (and through it the zoo's ``export_model``) and ``export_step`` all end here:
``finish_graph`` names the batch/time dims as the contract does and replaces the tracer's value
shapes by strict shape inference's; ``check_graph`` runs the full checker and strict shape
inference and checks the graph I/O against the contract, every batch/time dim symbolic, the
recurrent ops expected (native ``RNN``/``GRU``/``LSTM`` nodes, ``Scan`` loops over hand-written
cells, or neither for a one-step graph) and no traced size baked into an inferred value;
``attach_contract`` stores the contract in the metadata; ``write_model`` writes atomically.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import onnx

from rnnzoo.contract import CONTRACT_KEY, Contract, StateSpec, TensorSpec

NATIVE_OPS = {"RNN", "GRU", "LSTM"}
LOOP_OPS = {"Scan", "Loop"}


def attach_contract(model: onnx.ModelProto, contract: Contract) -> onnx.ModelProto:
    """Store the contract in the model's metadata (replacing any), and name the producer."""
    meta = {p.key: p.value for p in model.metadata_props}
    meta[CONTRACT_KEY] = contract.to_json()
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    model.producer_name = "rnnzoo"
    model.doc_string = contract.description or f"rnnzoo export of {contract.name}"
    return model


def _dims(v: onnx.ValueInfoProto) -> list[int | str | None]:
    return [
        d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
        for d in v.type.tensor_type.shape.dim
    ]


_MIN = re.compile(r"Max\(0, (\w+) - Max\(0, \1 - (\d+)\)\)")


def finish_graph(model: onnx.ModelProto, contract: Contract) -> dict[str, dict[int, str]]:
    """Name every batch/time dim of the graph I/O as the contract does, drop unused weights
    and replace the tracer's value shapes by strict shape inference's (no stale lengths).

    Returns the output dims that the contract has as fixed sizes but the graph computes from
    the batch/time sizes (``out[:, -4:]``: ``min(time, 4)``), as expressions in the contract's
    axis names: {output: {axis: expression}}."""
    graph = model.graph
    declared: dict[str, list] = {t.name: t.shape for t in [*contract.inputs, *contract.outputs]}
    for s in contract.states:
        declared[s.input] = declared[s.output] = s.shape
    renamed: dict[str, str] = {}
    for v in [*graph.input, *graph.output]:
        want = declared.get(v.name)
        dims = v.type.tensor_type.shape.dim
        if want is None or len(dims) != len(want):
            continue
        for d, w in zip(dims, want, strict=True):
            if isinstance(w, str) and d.dim_param:  # symbolic already: give it the axis name
                renamed.setdefault(d.dim_param, w)
                d.dim_param = w
    derived: dict[str, dict[int, str]] = {}
    for v in graph.output:
        want = declared.get(v.name)
        dims = v.type.tensor_type.shape.dim
        if want is None or len(dims) != len(want):
            continue
        for axis, (d, w) in enumerate(zip(dims, want, strict=True)):
            if isinstance(w, int) and d.dim_param:
                expr = re.sub(r"\w+", lambda m: renamed.get(m.group(0), m.group(0)), d.dim_param)
                expr = _MIN.sub(r"min(\1, \2)", expr)
                d.dim_param = expr
                derived.setdefault(v.name, {})[axis] = expr
    used = {n for node in graph.node for n in node.input}
    used |= {n for node in graph.node for a in node.attribute for n in _subgraph_inputs(a)}
    keep = [
        t for t in graph.initializer if t.name in used or t.name in {o.name for o in graph.output}
    ]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    graph.value_info.extend(inferred.graph.value_info)
    return derived


def _subgraph_inputs(attr: onnx.AttributeProto) -> set[str]:
    names: set[str] = set()
    for g in [attr.g, *attr.graphs] if attr.type in (attr.GRAPH, attr.GRAPHS) else []:
        for node in g.node:
            names.update(node.input)
            for a in node.attribute:
                names |= _subgraph_inputs(a)
    return names


def check_graph(
    model: onnx.ModelProto,
    contract: Contract,
    *,
    native: bool = True,
    scan: bool = False,
    stale_sizes: tuple[int, ...] = (),
) -> list[str]:
    """Checker + shape inference, the contract's I/O exactly, symbolic batch/time, right ops.

    ``native``: native RNN/GRU/LSTM nodes must be present (else none may be); ``scan``: the
    hand-written cells' ``Scan`` loops must be present (else no loop may be). Neither: a
    one-step graph, with no recurrent node or loop at all.
    ``stale_sizes``: the batch and time sizes the graph was traced at (chosen to collide with
    no fixed dim of the model): none may appear as a dim of any inferred intermediate value,
    where it would be a length baked in at export.
    """
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    problems = []
    if stale_sizes:
        for v in [*inferred.graph.value_info, *inferred.graph.output]:
            dims = _dims(v)
            if any(d in stale_sizes for d in dims if isinstance(d, int)):
                problems.append(
                    f"value {v.name!r} has shape {dims}: the example's batch/time size "
                    f"{stale_sizes} is baked in"
                )
    declared: dict[str, TensorSpec | StateSpec] = {
        t.name: t for t in [*contract.inputs, *contract.outputs]
    }
    for s in contract.states:
        declared[s.input] = s
        declared[s.output] = s
    graph_io = list(model.graph.input) + list(model.graph.output)
    names = [v.name for v in graph_io]
    if sorted(names) != sorted(declared):
        problems.append(f"graph I/O {names} != contract {sorted(declared)}")
    for v in graph_io:
        spec = declared.get(v.name)
        if spec is None:
            continue
        dims = _dims(v)
        if len(dims) != len(spec.shape):
            problems.append(f"{v.name}: rank {len(dims)} != contract {spec.shape}")
            continue
        for want, got in zip(spec.shape, dims, strict=True):
            if isinstance(want, str) and not isinstance(got, str):
                problems.append(f"{v.name}: axis {want!r} is {got!r} in the graph, not symbolic")
            if isinstance(want, int) and got != want:
                problems.append(f"{v.name}: dim {got!r} in the graph, contract says {want}")
    ops = {n.op_type for n in model.graph.node}
    if not native and not scan:
        if ops & (LOOP_OPS | NATIVE_OPS):
            problems.append(f"a one-step graph must not loop, got ops {sorted(ops)}")
    else:
        if native != bool(ops & NATIVE_OPS):
            problems.append(
                f"nn.RNN/GRU/LSTM layers must export as RNN/GRU/LSTM nodes (and only they), "
                f"got ops {sorted(ops)}"
            )
        if scan != bool(ops & LOOP_OPS):
            problems.append(
                f"hand-written cells must export as Scan loops (and only they), got {sorted(ops)}"
            )
    return problems


def write_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model file is meant to be read by servers
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
