"""pytorch-forecasting 1.8.0: ``pytorch_forecasting.models.nn.rnn.LSTM``/``GRU``, subclasses of
``nn.LSTM``/``nn.GRU`` whose forward takes ``lengths=`` and ``enforce_sorted=`` and packs the
padded batch inside (zero lengths allowed). ``RecurrentNetwork`` and ``DeepAR`` encode with
``_, hidden = self.rnn(x, lengths=encoder_lengths, enforce_sorted=False)`` and decode with
``out, _ = self.rnn(x, hidden, lengths=decoder_lengths, enforce_sorted=False)``."""

from __future__ import annotations

import torch
from gallery_case import REFUSED, Case
from torch import nn

LIB = "pytorch-forecasting"
VALUE_FLOW = r"Python control flow depends on tensor values at .*rnn\.py:\d+"


def _layer(kind: str, **kw):
    from pytorch_forecasting.models.nn import rnn

    torch.manual_seed(0)
    return getattr(rnn, kind)(batch_first=True, **kw)


class _Plain(nn.Module):
    """The layer called without lengths: its forward falls through to nn.LSTM's."""

    def __init__(self, layer):
        super().__init__()
        self.rnn = layer
        self.head = nn.Linear(layer.hidden_size, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


class _Encoder(nn.Module):
    """RecurrentNetwork.encode: the padded history with its lengths, the final state out."""

    def __init__(self, layer):
        super().__init__()
        self.rnn = layer

    def forward(self, x, lengths):
        _, hidden = self.rnn(x, lengths=lengths, enforce_sorted=False)
        return hidden


class _Decoder(nn.Module):
    """RecurrentNetwork.decode: the encoder's state in, a prediction per step out."""

    def __init__(self, layer):
        super().__init__()
        self.rnn = layer
        self.head = nn.Linear(layer.hidden_size, 1)

    def forward(self, x, h0, c0, lengths):
        out, _ = self.rnn(x, (h0, c0), lengths=lengths, enforce_sorted=False)
        return self.head(out)


def _plain(kind: str, **kw):
    def build():
        m = _Plain(_layer(kind, **kw)).eval()
        return m, (torch.randn(2, 6, kw["input_size"]),)

    return build


def _encoder(kind: str, **kw):
    def build():
        m = _Encoder(_layer(kind, **kw)).eval()
        return m, (torch.randn(3, 6, kw["input_size"]), torch.tensor([6, 4, 5]))

    return build


def _decoder():
    m = _Decoder(_layer("LSTM", input_size=3, hidden_size=8, num_layers=2)).eval()
    h = torch.zeros(2, 3, 8)
    return m, (torch.randn(3, 6, 3), h, h.clone(), torch.tensor([6, 4, 5]))


CASES = [
    Case(LIB, "pf_lstm_plain", _plain("LSTM", input_size=3, hidden_size=8, num_layers=2)),
    Case(LIB, "pf_gru_plain", _plain("GRU", input_size=3, hidden_size=8)),
    # with lengths=, the subclass's forward asserts and branches on the lengths' values
    # (rnn.py:125 `assert min_length >= 0`, then `if max_length == 0:`, `if min_length == 0:`):
    # value-dependent Python control flow, which no trace can keep
    Case(
        LIB,
        "pf_lstm_encoder_lengths",
        _encoder("LSTM", input_size=3, hidden_size=8, num_layers=2),
        expect=REFUSED,
        why=VALUE_FLOW,
    ),
    Case(
        LIB,
        "pf_gru_encoder_lengths",
        _encoder("GRU", input_size=3, hidden_size=8),
        expect=REFUSED,
        why=VALUE_FLOW,
    ),
    Case(LIB, "pf_lstm_decoder_lengths", _decoder, expect=REFUSED, why=VALUE_FLOW),
]
