"""RecurrentNet / Seq2Seq -> ONNX with symbolic batch and time axes and explicit state I/O.

``export_net`` swaps the model's recurrent core for an export-time stand-in (native ONNX
``RNN``/``GRU``/``LSTM`` nodes for ``nn.*`` layers, a ``Scan`` over the cell's own step for
hand-written cells) on a copy of the model, runs ``torch.onnx.export(dynamo=True)`` on the
model's own forward, checks the result (checker, shape inference, every batch/time dim
symbolic, native ops present / loops absent) and writes it with its contract in the
metadata. Nothing is written unless every check passes.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from rnnzoo.contract import CONTRACT_KEY, Contract
from rnnzoo.errors import InvalidArgument
from rnnzoo.export.contract_builder import BATCH, TIME, build_contract, exporter_versions
from rnnzoo.export.native import OPSET, NativeLayers, quiet_export
from rnnzoo.export.scan import ScratchLayers, expand_scratch_cells
from rnnzoo.models.cells import ScratchRNN
from rnnzoo.models.rnn import RecurrentNet, Seq2Seq

NATIVE_OPS = {"RNN", "GRU", "LSTM"}
LOOP_OPS = {"Scan", "Loop"}


def export_core(rnn: nn.Module) -> nn.Module:
    """The export-time stand-in for a recurrent core, or a clear error for what ONNX can't take."""
    if isinstance(rnn, ScratchRNN):
        return ScratchLayers(rnn)
    if isinstance(rnn, nn.RNNBase):
        return NativeLayers(rnn)
    raise InvalidArgument(
        f"cannot export a recurrent core of type {type(rnn).__name__}: supported are nn.RNN, "
        "nn.GRU, nn.LSTM and rnnzoo's ScratchRNN"
    )


class FlatNet(nn.Module):
    """Flat signature for the exporter and parity: (x, h0[, c0]) -> (y, hn[, cn])."""

    def __init__(self, net: RecurrentNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None = None):
        state = (h0,) if c0 is None else (h0, c0)
        y, new_state = self.net(x, state)
        return (y, *new_state)


def _example_inputs(net: RecurrentNet) -> tuple[torch.Tensor, ...]:
    # B=2, T=3: sizes > 1 so torch.export does not specialise either axis.
    cfg = net.cfg
    B, T = 2, 3
    if cfg.vocab_size is not None:
        x = torch.randint(0, cfg.vocab_size, (B, T), dtype=torch.int64)
    else:
        x = torch.randn(B, T, cfg.input_size)
    return (x, *(0.1 * s + 0.1 for s in net.initial_state(B)))


def to_onnx(net: RecurrentNet, contract: Contract) -> onnx.ModelProto:
    """The checked ONNX model of one RecurrentNet, contract in its metadata (nothing written)."""
    if not isinstance(net, RecurrentNet):
        raise InvalidArgument(f"expected a RecurrentNet, got {type(net).__name__}")
    core = export_core(net.rnn)  # raises before any work for what ONNX cannot express
    work = copy.deepcopy(net).eval()
    work.rnn = core
    in_names = [t.name for t in contract.inputs] + [s.input for s in contract.states]
    out_names = [t.name for t in contract.outputs] + [s.output for s in contract.states]
    args = _example_inputs(net)
    batch, time = torch.export.Dim(BATCH), torch.export.Dim(TIME)
    dyn: list[dict[int, Any]] = [{0: batch, 1: time}] + [{1: batch} for _ in args[1:]]
    with quiet_export():
        prog = torch.onnx.export(
            FlatNet(work),
            args,
            dynamo=True,
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=dyn,
            opset_version=OPSET,
            verbose=False,
            report=False,
        )
    model = prog.model_proto
    scratch = isinstance(net.rnn, ScratchRNN)
    if scratch:
        n = expand_scratch_cells(model, net.rnn)
        assert n == net.cfg.num_layers * net.cfg.num_directions, n
    check_graph(model, contract, scratch=scratch)
    return attach_contract(model, contract)


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
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
            for d in v.type.tensor_type.shape.dim]  # fmt: skip


def check_graph(
    model: onnx.ModelProto,
    contract: Contract,
    *,
    scratch: bool = False,
    step: bool = False,
    stale_sizes: tuple[int, ...] = (),
) -> None:
    """Checker + shape inference, the contract's I/O exactly, symbolic batch/time, right ops.

    ``scratch``: the recurrence must be ``Scan`` loops (else native RNN/GRU/LSTM nodes);
    ``step``: a one-step graph, with no recurrent node or loop at all.
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
    declared = {t.name: t for t in [*contract.inputs, *contract.outputs]}
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
    if step:
        if ops & (LOOP_OPS | NATIVE_OPS):
            problems.append(f"a one-step graph must not loop, got ops {sorted(ops)}")
    elif scratch:
        if not ops & LOOP_OPS or ops & NATIVE_OPS:
            problems.append(f"hand-written cells must export as Scan, got ops {sorted(ops)}")
    else:
        if not ops & NATIVE_OPS or ops & LOOP_OPS:
            problems.append(f"native cells must export as RNN/GRU/LSTM nodes, got {sorted(ops)}")
    if problems:
        raise RuntimeError("exported graph failed its checks:\n  - " + "\n  - ".join(problems))


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


def _source(ckpt_path: str | Path | None, sha: str | None) -> dict[str, str]:
    src = {f"{k}_version": v for k, v in exporter_versions().items()}
    src["opset"] = str(OPSET)
    if ckpt_path is not None:
        src["checkpoint"] = str(Path(ckpt_path).resolve())
        src["checkpoint_sha256"] = sha or ""
    return src


def export_model(
    model: RecurrentNet | Seq2Seq,
    out: str | Path,
    *,
    name: str,
    task: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_sha256: str | None = None,
) -> list[Path]:
    """Export a model to ``out`` (seq2seq: ``out`` minus .onnx plus .encoder/.decoder.onnx).

    Every graph is built and checked before the first file is written.
    """
    source = _source(checkpoint, checkpoint_sha256)
    out = Path(out)
    if isinstance(model, Seq2Seq):
        base = out.name.removesuffix(".onnx")
        parts = [
            ("encoder", model.encoder, out.with_name(f"{base}.encoder.onnx")),
            ("decoder", model.decoder, out.with_name(f"{base}.decoder.onnx")),
        ]
        group = name
        family = "seq2seq"
    elif isinstance(model, RecurrentNet):
        parts = [("model", model, out)]
        group = None
        family = "rnn"
    else:
        raise InvalidArgument(
            f"cannot export {type(model).__name__}: rnnzoo exports RecurrentNet and Seq2Seq"
        )
    protos = []
    for role, net, path in parts:
        extra = {"family": family, "config": net.cfg.to_dict()}
        extra["recurrent_op"] = "Scan" if isinstance(net.rnn, ScratchRNN) else "native"
        contract = build_contract(
            net.cfg,
            name=name if role == "model" else f"{name}.{role}",
            task=task,
            role=role,
            group=group,
            source=source,
            extra=extra,
        )
        protos.append((to_onnx(net, contract), path))
    return [write_model(m, p) for m, p in protos]
