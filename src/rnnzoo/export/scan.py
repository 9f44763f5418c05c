"""Hand-written cells (``ScratchRNN``) as ONNX ``Scan`` loops over their own step function.

A hand-written cell cannot be mapped onto a native ONNX op by name: nothing but its code
says what it computes. So each (layer, direction) becomes a ``Scan`` whose body is the
cell's own step function (``gru_cell``/``lstm_cell`` from ``rnnzoo.models.cells``) exported
with the dynamo exporter at a symbolic batch size. The time axis stays symbolic because
``Scan`` iterates over whatever length it is given.

Export runs in two steps, because a graph-valued attribute cannot pass through
``symbolic_multi_out``:
1. ``ScratchLayers`` is the export-time stand-in of a ``ScratchRNN`` (used by
   ``rnnzoo.export.lifting.FlatModule``, like ``NativeLayers`` for ``nn.RNN``/``GRU``/``LSTM``)
   and emits a placeholder node ``rnnzoo::ScratchCell(h0, [c0], X) -> (hn, [cn], Y)`` per
   (layer, direction), tagged with the index of its cell among the module's hand-written cells;
2. ``expand_scratch_cells`` replaces every placeholder by a ``Scan`` with that cell's exported
   step as its body (inputs: states then ``x_t``; outputs: new states then ``y_t``), reversed
   for the backward direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import onnx
import torch
from onnx import helper
from torch import nn

from rnnzoo.errors import InvalidArgument
from rnnzoo.export.native import OPSET, quiet_export
from rnnzoo.models.cells import GATES, ScratchRNN, gru_cell, lstm_cell

DOMAIN = "rnnzoo"
PLACEHOLDER = "ScratchCell"


def check_scratch(rnn: ScratchRNN) -> None:
    """Raise for a hand-written cell that cannot export."""
    if rnn.mode not in GATES:
        raise InvalidArgument(f"hand-written cell mode {rnn.mode!r} is not exportable")
    if next(rnn.parameters()).dtype != torch.float32:
        raise InvalidArgument("hand-written cells export as float32 only: call model.float()")


class ScratchLayers(nn.Module):
    """Export-time stand-in for a ``ScratchRNN``: one placeholder node per layer and direction.

    Its forward is for ``torch.onnx.export`` only; ``core`` numbers the cell among the
    module's hand-written cells, for ``expand_scratch_cells``.
    """

    def __init__(self, rnn: ScratchRNN, core: int = 0) -> None:
        super().__init__()
        check_scratch(rnn)
        self.mode = rnn.mode
        self.core = core
        self.hidden_size = rnn.hidden_size
        self.num_layers = rnn.num_layers
        self.num_directions = 2 if rnn.bidirectional else 1
        # The placeholder carries no weights; the Scan bodies will.

    def forward(self, x: torch.Tensor, hx=None):
        """x: (B, T, F); hx: h0 or (h0, c0), each (L*D, B, H) -> like ScratchRNN."""
        lstm = self.mode == "lstm"
        if hx is None:
            zeros = x.new_zeros(self.num_layers * self.num_directions, x.shape[0], self.hidden_size)
            hx = (zeros, zeros) if lstm else zeros
        h0, c0 = hx if lstm else (hx, None)
        D, H = self.num_directions, self.hidden_size
        seq = x.transpose(0, 1)  # (T, B, F): Scan iterates over axis 0
        T, B = seq.shape[0], seq.shape[1]
        hs, cs = [], []
        for layer in range(self.num_layers):
            ys = []
            for d in range(D):
                idx = layer * D + d
                states = [h0[idx], cast(Any, c0)[idx]] if lstm else [h0[idx]]  # each (B, H)
                outs = torch.onnx.ops.symbolic_multi_out(
                    f"{DOMAIN}::{PLACEHOLDER}",
                    [*states, seq],
                    {"layer": layer, "reverse": d, "core": self.core},
                    dtypes=[x.dtype] * (len(states) + 1),
                    shapes=[[B, H]] * len(states) + [[T, B, H]],
                    version=1,
                )
                hs.append(outs[0])
                if lstm:
                    cs.append(outs[1])
                ys.append(outs[-1])  # (T, B, H)
            seq = torch.cat(ys, dim=2) if D > 1 else ys[0]  # (T, B, D*H)
        out = seq.transpose(0, 1)  # (B, T, D*H)
        hn = torch.stack(hs)  # (L*D, B, H)
        return (out, (hn, torch.stack(cs))) if lstm else (out, hn)


class _Step(nn.Module):
    """One step of one (layer, direction) of a ScratchRNN, weights baked in as constants."""

    def __init__(self, rnn: ScratchRNN, layer: int, reverse: bool) -> None:
        super().__init__()
        self.lstm = rnn.mode == "lstm"
        for name, p in zip(
            ("w_ih", "w_hh", "b_ih", "b_hh"), rnn._params(layer, reverse), strict=True
        ):
            self.register_buffer(name, p.detach().clone())

    def forward(self, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None):
        """LSTM: (h, c, x) -> (h', c'); GRU: (h, x) -> (h',). h, c: (B, H), x: (B, F)."""
        # buffers (register_buffer above), typed Tensor | Module through nn.Module.__getattr__
        w = cast("tuple[torch.Tensor, ...]", (self.w_ih, self.w_hh, self.b_ih, self.b_hh))
        if self.lstm:
            return lstm_cell(cast(torch.Tensor, b), h, a, *w)  # an LSTM step gets x as b
        return (gru_cell(a, h, *w),)


def step_body(rnn: ScratchRNN, layer: int, reverse: bool, prefix: str) -> onnx.GraphProto:
    """The cell's step as a Scan body: (h, [c], x_t) -> (h', [c'], y_t = h'), names prefixed."""
    step = _Step(rnn, layer, reverse).eval()
    in_size = getattr(rnn, f"weight_ih_l{layer}").shape[1]
    B = 2
    h = torch.zeros(B, rnn.hidden_size)
    args = (h, h.clone(), torch.zeros(B, in_size)) if step.lstm else (h, torch.zeros(B, in_size))
    names = ["h", "c", "x"] if step.lstm else ["h", "x"]
    batch = torch.export.Dim("batch")
    with quiet_export():
        prog = torch.onnx.export(
            step,
            args,
            dynamo=True,
            input_names=names,
            output_names=["h_next", "c_next"] if step.lstm else ["h_next"],
            dynamic_shapes=[{0: batch} for _ in args],
            opset_version=OPSET,
            verbose=False,
        )
    assert prog is not None  # dynamo=True returns the program
    model = prog.model_proto
    if model.functions:
        raise InvalidArgument("the cell's step exported with local functions; cannot inline")
    graph = model.graph
    _prefix_names(graph, prefix)
    # y_t: the new hidden state, stacked over time by the Scan.
    h_next = graph.output[0]
    y_name = prefix + "y_t"
    graph.node.append(helper.make_node("Identity", [h_next.name], [y_name], name=y_name))
    y = onnx.ValueInfoProto()
    y.CopyFrom(h_next)
    y.name = y_name
    graph.output.append(y)
    graph.name = prefix.rstrip("/")
    return graph


def _prefix_names(graph: onnx.GraphProto, prefix: str) -> None:
    """Make every value and node name in a body unique within the outer graph."""

    def ren(n: str) -> str:
        return prefix + n if n else n

    for node in graph.node:
        node.input[:] = [ren(n) for n in node.input]
        node.output[:] = [ren(n) for n in node.output]
        node.name = ren(node.name or node.op_type)
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            v.name = ren(v.name)
    for init in graph.initializer:
        init.name = ren(init.name)


def expand_scratch_cells(model: onnx.ModelProto, cores: Sequence[ScratchRNN]) -> int:
    """Replace each ``rnnzoo::ScratchCell`` placeholder by a Scan over its cell's step.

    ``cores``: the module's hand-written cells, indexed by the placeholders' ``core``.
    Returns how many were replaced.
    """
    graph = model.graph
    count = 0
    seen: dict[str, int] = {}
    for i, node in enumerate(list(graph.node)):
        if node.domain != DOMAIN or node.op_type != PLACEHOLDER:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        layer, reverse, core = int(attrs["layer"]), int(attrs["reverse"]), int(attrs["core"])
        base = f"scan{core}_l{layer}{'_rev' if reverse else ''}"
        seen[base] = seen.get(base, 0) + 1  # a cell called twice: one Scan per call
        prefix = base + (f"_call{seen[base]}" if seen[base] > 1 else "") + "/"
        body = step_body(cores[core], layer, bool(reverse), prefix)
        scan = helper.make_node(
            "Scan",
            list(node.input),  # states then X
            list(node.output),  # final states then Y
            name=prefix.rstrip("/"),
            body=body,
            num_scan_inputs=1,
            scan_input_directions=[reverse],
            scan_output_directions=[reverse],
        )
        graph.node[i].CopyFrom(scan)
        count += 1
    # The placeholder domain is gone from the graph: drop its opset import.
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return count
