"""The hand-written cells equal nn.GRU / nn.LSTM given the same weights."""

import pytest
import torch
from torch import nn

from rnnzoo.models.cells import ScratchRNN, gru_cell, lstm_cell

CASES = [  # (layers, bidirectional)
    (1, False),
    (2, False),
    (1, True),
    (3, True),
]


@pytest.mark.parametrize("mode", ["gru", "lstm"])
@pytest.mark.parametrize(("layers", "bidir"), CASES)
def test_scratch_equals_native(mode, layers, bidir):
    torch.manual_seed(0)
    native_cls = nn.GRU if mode == "gru" else nn.LSTM
    native = native_cls(5, 7, num_layers=layers, bidirectional=bidir, batch_first=True)
    scratch = ScratchRNN(mode, 5, 7, num_layers=layers, bidirectional=bidir)
    missing = scratch.load_state_dict(native.state_dict())  # same names, shapes and gate order
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(3, 11, 5)
    shape = (layers * (2 if bidir else 1), 3, 7)
    h0 = torch.randn(shape)
    hx = (h0, torch.randn(shape)) if mode == "lstm" else h0
    with torch.no_grad():
        y_n, s_n = native(x, hx)
        y_s, s_s = scratch(x, hx)
    torch.testing.assert_close(y_s, y_n, atol=1e-6, rtol=1e-5)
    for a, b in zip(
        s_s if mode == "lstm" else [s_s], s_n if mode == "lstm" else [s_n], strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradients_match_native():
    torch.manual_seed(1)
    native = nn.LSTM(4, 6, batch_first=True)
    scratch = ScratchRNN("lstm", 4, 6)
    scratch.load_state_dict(native.state_dict())
    x = torch.randn(2, 9, 4)
    native(x)[0].square().sum().backward()
    scratch(x)[0].square().sum().backward()
    for name, p in scratch.named_parameters():
        torch.testing.assert_close(
            p.grad, dict(native.named_parameters())[name].grad, atol=1e-5, rtol=1e-4
        )


def test_single_step_cells_match_native_cells():
    torch.manual_seed(2)
    x, h, c = torch.randn(3, 4), torch.randn(3, 5), torch.randn(3, 5)
    g = nn.GRUCell(4, 5)
    torch.testing.assert_close(
        gru_cell(x, h, g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh), g(x, h)
    )
    lc = nn.LSTMCell(4, 5)
    h1, c1 = lstm_cell(x, h, c, lc.weight_ih, lc.weight_hh, lc.bias_ih, lc.bias_hh)
    h2, c2 = lc(x, (h, c))
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(c1, c2)


def test_zero_initial_state_is_default():
    torch.manual_seed(3)
    s = ScratchRNN("gru", 2, 3, num_layers=2)
    x = torch.randn(1, 4, 2)
    y_default, _ = s(x)
    y_zeros, _ = s(x, torch.zeros(2, 1, 3))
    torch.testing.assert_close(y_default, y_zeros)


def test_rejects_unknown_mode():
    with pytest.raises(AssertionError, match="mode must be one of"):
        ScratchRNN("rnn", 2, 3)
