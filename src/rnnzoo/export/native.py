"""Native ONNX ``RNN``/``GRU``/``LSTM`` nodes for ``nn.RNN``/``nn.GRU``/``nn.LSTM``.

``NativeLayers`` stands in for an ``nn.RNN``/``nn.GRU``/``nn.LSTM`` during
export (used by ``rnnzoo.export.lifting.FlatModule``'s capture): its forward emits one
native ONNX node per layer through ``torch.onnx.ops.symbolic_multi_out``
(bidirectional layers as one node with ``direction="bidirectional"``), so the graph keeps a
symbolic time axis instead of the unrolled or length-specialised graph that the default
translation of ``nn.RNN``/``nn.GRU``/``nn.LSTM`` produces in torch 2.13 (see REFERENCE.md).

PyTorch and ONNX disagree on gate order and bias layout; ``onnx_weights`` converts:
- LSTM: PyTorch gates i, f, g, o -> ONNX i, o, f, c;
- GRU: PyTorch r, z, n -> ONNX z, r, h, with ``linear_before_reset=1`` (PyTorch applies the
  reset gate after the hidden matmul);
- ONNX ``B`` is ``[Wb, Rb]`` concatenated; ``W``, ``R``, ``B`` carry a leading direction axis.
ONNX ``Y`` is ``(T, D, B, H)`` and ORT rejects ``layout=1``, so the node runs time-major
between two transposes.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from rnnzoo.errors import InvalidArgument

OPSET = 20


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Mute the exporter's registry chatter and deprecation warnings; errors still raise."""
    lg = logging.getLogger("torch.onnx")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(level)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the duration (restored after).

    The exporter's and the parity check's eager runs are many small calls (a few steps of a
    small net each); on a shared 2-core host each of them, run with 2 OpenMP threads, waited
    on the busy core (a tiny GRU's full parity grid: 107 s with 2 threads). The server's ONNX
    Runtime sessions run on one thread too. One thread changes no result beyond summation order.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# PyTorch gate chunk index for each ONNX gate position.
GATE_ORDER = {"RNN": [0], "GRU": [1, 0, 2], "LSTM": [0, 3, 1, 2]}


def onnx_op(rnn: nn.Module) -> str:
    """The ONNX op for a torch recurrent module; raises for what ONNX cannot express."""
    if isinstance(rnn, nn.LSTM):
        if rnn.proj_size:
            raise InvalidArgument(
                f"LSTM proj_size={rnn.proj_size} is not supported: ONNX LSTM has no projection; "
                "retrain with proj_size=0"
            )
        return "LSTM"
    if isinstance(rnn, nn.GRU):
        return "GRU"
    if isinstance(rnn, nn.RNN):
        return "RNN"
    raise InvalidArgument(f"{type(rnn).__name__} has no native ONNX recurrent op")


def onnx_weights(rnn: nn.RNNBase, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (D, G*H, F), R (D, G*H, H), B (D, 2*G*H) of one layer, in ONNX gate order."""
    op = onnx_op(rnn)
    H = rnn.hidden_size
    order = GATE_ORDER[op]
    idx = torch.cat([torch.arange(g * H, (g + 1) * H) for g in order])  # (G*H,)
    Ws, Rs, Bs = [], [], []
    for suffix in ["", "_reverse"][: 2 if rnn.bidirectional else 1]:
        k = f"l{layer}{suffix}"
        w_ih = getattr(rnn, f"weight_ih_{k}").detach()
        w_hh = getattr(rnn, f"weight_hh_{k}").detach()
        if rnn.bias:
            b_ih = getattr(rnn, f"bias_ih_{k}").detach()
            b_hh = getattr(rnn, f"bias_hh_{k}").detach()
        else:  # ONNX treats a missing bias as zeros; keep the node uniform instead
            b_ih = b_hh = w_ih.new_zeros(w_ih.shape[0])
        Ws.append(w_ih[idx])
        Rs.append(w_hh[idx])
        Bs.append(torch.cat([b_ih[idx], b_hh[idx]]))
    return torch.stack(Ws).clone(), torch.stack(Rs).clone(), torch.stack(Bs).clone()


class NativeLayers(nn.Module):
    """Export-time stand-in for ``nn.RNN/GRU/LSTM``, same call signature and layout.

    Its forward is for ``torch.onnx.export`` only (eager runs use the original layer).
    Batch-first and time-major layers both export (the node itself always runs time-major);
    ``hx=None`` means zero initial states, as in PyTorch.
    """

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.op = onnx_op(rnn)
        self.batch_first = bool(rnn.batch_first)
        if next(rnn.parameters()).dtype != torch.float32:
            raise InvalidArgument(
                f"parameters are {next(rnn.parameters()).dtype}; ONNX Runtime's CPU recurrent "
                "kernels are float32 only: call model.float() before exporting"
            )
        self.hidden_size = rnn.hidden_size
        self.num_layers = rnn.num_layers
        self.num_directions = 2 if rnn.bidirectional else 1
        self.attrs: dict = {"hidden_size": rnn.hidden_size}
        if rnn.bidirectional:
            self.attrs["direction"] = "bidirectional"
        if self.op == "GRU":
            self.attrs["linear_before_reset"] = 1
        if self.op == "RNN":
            act = "Relu" if rnn.nonlinearity == "relu" else "Tanh"
            self.attrs["activations"] = [act] * self.num_directions
        for layer in range(rnn.num_layers):
            W, R, B = onnx_weights(rnn, layer)
            self.register_buffer(f"W{layer}", W)
            self.register_buffer(f"R{layer}", R)
            self.register_buffer(f"B{layer}", B)

    def forward(self, x: torch.Tensor, hx=None, lengths: torch.Tensor | None = None):
        """x: (B, T, F) or (T, B, F); hx: h0 or (h0, c0), each (L*D, B, H) -> like nn.LSTM.

        ``lengths`` (B,): per-sequence lengths (ONNX ``sequence_lens``; a packed input): ``x``
        is then time-major whatever the layer's layout, and so is the output."""
        lstm = self.op == "LSTM"
        time_major = self.batch_first and lengths is None
        # (T, B, F): ORT runs only the time-major layout
        seq = x.transpose(0, 1) if time_major else x
        lens = None if lengths is None else lengths.to(torch.int32)
        T, B = seq.shape[0], seq.shape[1]
        D, H = self.num_directions, self.hidden_size
        if hx is None:
            zeros = seq.new_zeros(self.num_layers * D, B, H)
            hx = (zeros, zeros) if lstm else zeros
        h0, c0 = hx if lstm else (hx, None)
        hs, cs = [], []
        for layer in range(self.num_layers):
            sl = slice(layer * D, (layer + 1) * D)
            inputs = [seq, getattr(self, f"W{layer}"), getattr(self, f"R{layer}")]
            inputs += [getattr(self, f"B{layer}"), lens, h0[sl]]
            if lstm:
                inputs.append(cast(Any, c0)[sl])  # an LSTM's hx is (h0, c0)
            n_out = 3 if lstm else 2
            outs = torch.onnx.ops.symbolic_multi_out(
                self.op,
                inputs,
                self.attrs,
                dtypes=[x.dtype] * n_out,
                shapes=[[T, D, B, H]] + [[D, B, H]] * (n_out - 1),
                version=OPSET,
            )
            Y = outs[0]  # (T, D, B, H)
            seq = Y.permute(0, 2, 1, 3).reshape(T, B, D * H)  # (T, B, D*H)
            hs.append(outs[1])
            if lstm:
                cs.append(outs[2])
        out = seq.transpose(0, 1) if time_major else seq  # (B, T, D*H) or (T, B, D*H)
        hn = torch.cat(hs, dim=0)  # (L*D, B, H)
        return (out, (hn, torch.cat(cs, dim=0))) if lstm else (out, hn)
