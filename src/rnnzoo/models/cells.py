"""GRU and LSTM written by hand from their gate equations.

These are the from-scratch versions of the classic tutorials. ``ScratchRNN`` has the same
parameter names, shapes and gate order as ``nn.GRU``/``nn.LSTM`` (``weight_ih_l0`` holds the
input weights of every gate stacked, PyTorch order), so a state dict moves freely between
the two and ``tests/test_cells.py`` proves the outputs equal.

GRU (gates r, z, n):
    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))     # reset applied after the matmul
    h' = (1 - z) * n + z * h
LSTM (gates i, f, g, o):
    i, f, o = sigmoid(...), g = tanh(...)   each W_i* x + b_i* + W_h* h + b_h*
    c' = f * c + i * g
    h' = o * tanh(c')
"""

from __future__ import annotations

import math

import torch
from torch import nn

GATES = {"gru": 3, "lstm": 4}


def gru_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor,
    b_hh: torch.Tensor,
) -> torch.Tensor:
    """One GRU step. x: (B, F), h: (B, H) -> h': (B, H)."""
    gi = x @ w_ih.T + b_ih  # (B, 3H)
    gh = h @ w_hh.T + b_hh  # (B, 3H)
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def lstm_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor,
    b_hh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step. x: (B, F), h, c: (B, H) -> (h', c')."""
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    return h_next, c_next


class ScratchRNN(nn.Module):
    """A drop-in for ``nn.GRU``/``nn.LSTM`` (batch_first=True) built on the cells above."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        assert mode in GATES, f"mode must be one of {sorted(GATES)}, got {mode!r}"
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.dropout = dropout
        self.batch_first = True
        gates = GATES[mode]
        dirs = 2 if bidirectional else 1
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size * dirs
            for suffix in ["", "_reverse"][:dirs]:
                k = f"l{layer}{suffix}"
                self.register_parameter(
                    f"weight_ih_{k}", nn.Parameter(torch.empty(gates * hidden_size, in_size))
                )
                self.register_parameter(
                    f"weight_hh_{k}", nn.Parameter(torch.empty(gates * hidden_size, hidden_size))
                )
                self.register_parameter(
                    f"bias_ih_{k}", nn.Parameter(torch.empty(gates * hidden_size))
                )
                self.register_parameter(
                    f"bias_hh_{k}", nn.Parameter(torch.empty(gates * hidden_size))
                )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as nn.GRU/nn.LSTM: U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias.
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _params(self, layer: int, reverse: bool) -> tuple[torch.Tensor, ...]:
        k = f"l{layer}{'_reverse' if reverse else ''}"
        return tuple(
            getattr(self, f"{n}_{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )

    def forward(self, x: torch.Tensor, hx=None):
        """x: (B, T, F); hx: h0 (GRU) or (h0, c0) (LSTM), each (L*D, B, H).

        Returns (out: (B, T, D*H), h_n) or (out, (h_n, c_n)), like nn.GRU/nn.LSTM.
        """
        B, T, _ = x.shape
        assert T >= 1, "a sequence needs at least one step"
        dirs = 2 if self.bidirectional else 1
        shape = (self.num_layers * dirs, B, self.hidden_size)
        lstm = self.mode == "lstm"
        if hx is None:
            h0 = x.new_zeros(shape)
            c0 = x.new_zeros(shape) if lstm else None
        else:
            h0, c0 = hx if lstm else (hx, None)
        assert h0.shape == shape, f"h0 must be {shape}, got {tuple(h0.shape)}"
        h_out, c_out = [], []
        layer_in = x  # (B, T, F)
        for layer in range(self.num_layers):
            dir_outputs = []
            for d in range(dirs):
                idx = layer * dirs + d
                w = self._params(layer, reverse=d == 1)
                h = h0[idx]  # (B, H)
                c = c0[idx] if c0 is not None else h
                steps = range(T - 1, -1, -1) if d == 1 else range(T)
                ys: list[torch.Tensor] = [h] * T  # every slot is overwritten below
                for t in steps:
                    if lstm:
                        h, c = lstm_cell(layer_in[:, t], h, c, *w)
                    else:
                        h = gru_cell(layer_in[:, t], h, *w)
                    ys[t] = h
                dir_outputs.append(torch.stack(ys, dim=1))  # (B, T, H)
                h_out.append(h)
                if lstm:
                    c_out.append(c)
            layer_in = torch.cat(dir_outputs, dim=2)  # (B, T, D*H)
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                layer_in = nn.functional.dropout(layer_in, self.dropout)
        h_n = torch.stack(h_out)  # (L*D, B, H)
        if lstm:
            return layer_in, (h_n, torch.stack(c_out))
        return layer_in, h_n
