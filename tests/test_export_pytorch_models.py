"""PyTorch's own RNN export test models, exported by export_module and verified.

The modules below behave as those in pytorch/pytorch's test/onnx/model_defs (BSD-3-Clause):
``word_language_model.py`` (RNNModel and its tensor-/tuple-hidden variants, from
pytorch/examples), ``lstm_flattening_result.py`` (an nn.LSTM subclass returning
``(out, h, c)``, and wrappers with and without a packed input) and
``rnn_model_with_packed_sequence.py`` (pack_padded_sequence -> layer -> pad_packed_sequence,
with and without a state). They are written here from those files' behaviour, not copied.
Every expressible one exports and verifies against the module; a PackedSequence given as
the forward's argument is not a tensor a graph can take, and says so.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import rnn as rnn_utils

from rnnzoo.errors import InvalidArgument
from rnnzoo.export.module_export import export_module
from rnnzoo.export.module_verify import verify_module

GRID = {"times": (1, 2, 9), "batches": (1, 3), "stream": (9, 3)}
NTOKEN, NINP, NHID = 17, 6, 6


def _layer(kind: str, inp: int, hid: int, layers: int, **kw) -> nn.Module:
    if kind in ("LSTM", "GRU"):
        return getattr(nn, kind)(inp, hid, layers, **kw)
    return nn.RNN(inp, hid, layers, nonlinearity={"RNN_TANH": "tanh", "RNN_RELU": "relu"}[kind])


class WordLM(nn.Module):
    """Embedding, a time-major recurrent layer fed its state, a decoder over (T*B, H)."""

    def __init__(self, kind: str, layers: int = 2, tie: bool = False) -> None:
        super().__init__()
        self.kind, self.layers = kind, layers
        self.drop = nn.Dropout(0.5)
        self.encoder = nn.Embedding(NTOKEN, NINP)
        self.rnn = _layer(kind, NINP, NHID, layers)
        self.decoder = nn.Linear(NHID, NTOKEN)
        if tie:
            self.decoder.weight = self.encoder.weight
        self.hidden = None

    def init_hidden(self, batch: int):
        z = torch.zeros(self.layers, batch, NHID)
        return (z, z.clone()) if self.kind == "LSTM" else z

    def forward(self, input, hidden=None):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output.view(output.size(0) * output.size(1), output.size(2)))
        self.hidden = tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden
        return decoded.view(output.size(0), output.size(1), decoded.size(1))


class LSTMReturningFlat(nn.LSTM):
    """An nn.LSTM subclass whose forward returns (output, h_n, c_n)."""

    def forward(self, input, *args, **kwargs):
        output, (hidden, cell) = nn.LSTM.forward(self, input, *args, **kwargs)
        return output, hidden, cell


class InnerLSTM(nn.Module):
    def __init__(self, layers: int, bidirectional: bool, batch_first: bool) -> None:
        super().__init__()
        self.inner_model = nn.LSTM(
            3, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first
        )

    def forward(self, input, hx=None):
        output, (hidden, cell) = self.inner_model.forward(input, hx)
        return output, hidden, cell


class PackedAround(nn.Module):
    """pack_padded_sequence -> model -> pad_packed_sequence, the state passed or not."""

    def __init__(self, model: nn.Module, batch_first: bool, with_state: bool) -> None:
        super().__init__()
        self.model, self.batch_first, self.with_state = model, batch_first, with_state

    def forward(self, input, *args):
        *state, lengths = args
        packed = rnn_utils.pack_padded_sequence(input, lengths, self.batch_first)
        rets = self.model(packed, *state)
        out, _ = rnn_utils.pad_packed_sequence(rets[0], self.batch_first)
        return [out, *rets[1:]]


def _word_lm(kind: str, **kw):
    module = WordLM(kind, **kw).eval()
    tokens = torch.randint(0, NTOKEN, (5, 2))  # (T, B)
    return module, (tokens, module.init_hidden(2))


def _packed(kind: str, batch_first: bool, with_state: bool):
    model = _layer(kind, 3, 5, 2, batch_first=batch_first) if kind != "RNN_TANH" else None
    if model is None:
        model = nn.RNN(3, 5, 2, batch_first=batch_first)
    module = PackedAround(model, batch_first, with_state).eval()
    x = torch.randn(2, 6, 3) if batch_first else torch.randn(6, 2, 3)
    lengths = torch.tensor([6, 4])
    if not with_state:
        return module, (x, lengths)
    h = torch.zeros(2, 2, 5)
    return module, (x, (h, h.clone()) if kind == "LSTM" else h, lengths)


CASES = {
    "word_lm_lstm": lambda: _word_lm("LSTM"),
    "word_lm_gru": lambda: _word_lm("GRU"),
    "word_lm_rnn_tanh": lambda: _word_lm("RNN_TANH"),
    "word_lm_rnn_relu_tied": lambda: _word_lm("RNN_RELU", tie=True),
    "word_lm_tuple_hidden_none": lambda: (
        WordLM("LSTM").eval(),
        (torch.randint(0, NTOKEN, (5, 2)), None),
    ),
    "lstm_flattening_subclass": lambda: (
        LSTMReturningFlat(3, 5, 2, bidirectional=True).eval(),
        (torch.randn(6, 2, 3),),
    ),
    "lstm_flattening_without_seq_length": lambda: (
        InnerLSTM(2, False, True).eval(),
        (torch.randn(2, 6, 3), (torch.zeros(2, 2, 5), torch.zeros(2, 2, 5))),
    ),
    "lstm_flattening_without_seq_length_no_state": lambda: (
        InnerLSTM(1, True, False).eval(),
        (torch.randn(6, 2, 3),),
    ),
    "packed_lstm_batch_first": lambda: _packed("LSTM", True, False),
    "packed_gru_time_major_with_state": lambda: _packed("GRU", False, True),
    "packed_rnn_with_state": lambda: _packed("RNN_TANH", True, True),
}
STREAMABLE = {
    "word_lm_lstm": True,
    "word_lm_gru": True,
    "word_lm_rnn_tanh": True,
    "word_lm_rnn_relu_tied": True,
    "word_lm_tuple_hidden_none": True,
    "lstm_flattening_subclass": False,  # bidirectional
    "lstm_flattening_without_seq_length": True,
    "lstm_flattening_without_seq_length_no_state": False,  # bidirectional
    "packed_lstm_batch_first": False,  # whole sequences with their lengths
    "packed_gru_time_major_with_state": False,
    "packed_rnn_with_state": False,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pytorchs_rnn_export_test_model_exports_and_verifies(tmp_path, case):
    module, example = CASES[case]()
    path = tmp_path / f"{case}.onnx"
    contract = export_module(module, example, path, name=case)
    assert contract.streamable is STREAMABLE[case], contract.extra["streamable_reason"]
    if case.startswith("packed"):
        assert list(contract.extra["lengths"].values()) == ["steps"]
    report = verify_module(module, path, **GRID)
    assert report.ok, report.summary()


def test_a_packed_sequence_as_the_forwards_argument_says_what_to_pass_instead(tmp_path):
    module = InnerLSTM(1, False, True).eval()
    packed = rnn_utils.pack_padded_sequence(torch.randn(2, 6, 3), torch.tensor([6, 4]), True)
    with pytest.raises(InvalidArgument, match="PackedSequence"):
        export_module(module, (packed,), tmp_path / "m.onnx", name="m")
