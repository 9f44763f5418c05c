"""speechbrain 1.1.2: ``speechbrain.nnet.RNN.LSTM``/``GRU``/``RNN``, the wrappers its recipes
(CRDNN, the attentional decoders) stack. Each forward calls ``self.rnn.flatten_parameters()``,
takes ``(batch, time, fea)`` or a 4-d ``(batch, time, fea, channel)`` input, an optional
``hx`` and relative ``lengths`` (packed inside), and returns ``(output, hn)``."""

from __future__ import annotations

import torch
from gallery_case import EXPORTS, Case

LIB = "speechbrain"


def _net(kind: str, **kw):
    def build():
        from speechbrain.nnet import RNN

        torch.manual_seed(0)
        net = getattr(RNN, kind)(**kw).eval()
        shape = kw.get("input_shape") or (2, 5, kw["input_size"])
        return net, (torch.randn(*shape),)

    return build


class _WithState(torch.nn.Module):
    """A recipe's streaming use: the caller keeps ``hx`` and passes it back in."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, h0, c0):
        out, (h, c) = self.net(x, hx=(h0, c0))
        return out, h, c


def _lstm_with_state():
    from speechbrain.nnet.RNN import LSTM

    torch.manual_seed(0)
    net = _WithState(LSTM(hidden_size=12, input_size=6, num_layers=2)).eval()
    return net, (torch.randn(2, 5, 6), torch.zeros(2, 2, 12), torch.zeros(2, 2, 12))


class _Lengths(torch.nn.Module):
    """A padded batch with relative lengths, as speechbrain's data pipeline gives it."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, lengths):
        out, _ = self.net(x, lengths=lengths)
        return out


def _gru_lengths():
    from speechbrain.nnet.RNN import GRU

    torch.manual_seed(0)
    net = _Lengths(GRU(hidden_size=10, input_size=6)).eval()
    return net, (torch.randn(3, 7, 6), torch.tensor([1.0, 0.6, 0.9]))


CASES = [
    Case(LIB, "sb_lstm", _net("LSTM", hidden_size=16, input_size=8)),
    Case(LIB, "sb_lstm_2layer", _net("LSTM", hidden_size=12, input_size=8, num_layers=2)),
    Case(LIB, "sb_gru", _net("GRU", hidden_size=16, input_size=8)),
    Case(LIB, "sb_gru_3layer", _net("GRU", hidden_size=8, input_size=5, num_layers=3)),
    Case(LIB, "sb_rnn_relu", _net("RNN", hidden_size=16, input_size=8)),
    Case(
        LIB,
        "sb_rnn_tanh_2layer",
        _net("RNN", hidden_size=8, input_size=4, nonlinearity="tanh", num_layers=2),
    ),
    Case(
        LIB,
        "sb_lstm_bidirectional",
        _net("LSTM", hidden_size=8, input_size=6, bidirectional=True),
        expect=EXPORTS,
        why="bidirectional",
    ),
    Case(
        LIB,
        "sb_gru_bidirectional_2layer",
        _net("GRU", hidden_size=8, input_size=6, num_layers=2, bidirectional=True),
        expect=EXPORTS,
        why="bidirectional",
    ),
    Case(LIB, "sb_lstm_4d_input", _net("LSTM", hidden_size=8, input_shape=(2, 5, 3, 2))),
    Case(LIB, "sb_lstm_hx_in_and_out", _lstm_with_state),
    Case(
        LIB,
        "sb_gru_relative_lengths",
        _gru_lengths,
        expect=EXPORTS,  # ragged rows: a chunk of a padded row is not that row's chunk
    ),
]
