"""export_module on modules written the way people write them, not the way the exporter likes.

The cases come from issue 19: state passed in and not returned, ``hidden=None`` at batch 1,
a layer that the forward flattens and reads attributes of, a cell called once per forward, a
module that needs a few steps before it runs, outputs sliced on time, empty dims, a causal
but non-streamable normalisation, time folded into batch. Each is exported, verified against
the module (parity engine, quick grid) and, where streamable, streamed through ONNX Runtime
in random chunks with the state carried (<= 1e-5).
"""

from __future__ import annotations

import copy
import pickle

import onnx
import pytest
import torch
from test_export_module import stream_through_ort
from torch import nn

from rnnzoo.errors import InvalidArgument
from rnnzoo.export.module_export import export_module
from rnnzoo.export.module_verify import verify_module

QUICK = {"times": (1, 2, 7, 20), "batches": (1, 3), "stream": (20, 3)}


class Forecaster(nn.Module):
    """The classic tutorial: ``forward(x, hidden)``, ``out.view(-1, H)``, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden_dim = 10
        self.rnn = nn.RNN(1, 10, 1, batch_first=True)
        self.fc = nn.Linear(10, 1)

    def forward(self, x, hidden):
        r_out, hidden = self.rnn(x, hidden)
        r_out = r_out.view(-1, self.hidden_dim)
        return self.fc(r_out), hidden


class WordLanguageModel(nn.Module):
    """pytorch/examples' word language model shape: state in, only the decoded output out."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(20, 6)
        self.rnn = nn.LSTM(6, 8, 2)
        self.decoder = nn.Linear(8, 20)

    def forward(self, input, hidden):
        out, _ = self.rnn(self.encoder(input), hidden)
        return self.decoder(out)


class FlattensAndReads(nn.Module):
    """speechbrain/asteroid style: flatten_parameters() and the layer's attributes in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)

    def forward(self, x):
        self.rnn.flatten_parameters()
        h = x.new_zeros(self.rnn.num_layers, x.shape[0], self.rnn.hidden_size)
        return self.rnn(x, h)[0]


class OneCellStep(nn.Module):
    """A decoder step: one nn.LSTMCell call per forward, the state in and out."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x, h, c):
        h, c = self.cell(x, (h, c))
        return self.head(h), h, c


class LoopedCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(3, 4)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return h


class ValidConv(nn.Module):
    """A convolution without padding before the GRU: needs T >= 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3)
        self.gru = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        return self.gru(self.conv(x.transpose(1, 2)).transpose(1, 2))[0]


class LastSteps(nn.Module):
    """darts' BlockRNNModel: the last 4 steps of the output (``out[:, -h:]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0][:, -4:]


class CumulativeNorm(nn.Module):
    """A GRU then a cumulative normalisation over the steps so far (asteroid's cLN)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        out, _ = self.gru(x)
        n = torch.arange(1, out.shape[1] + 1, dtype=out.dtype).view(1, -1, 1) * out.shape[2]
        return out - out.sum(2, keepdim=True).cumsum(1) / n


class WithEmptyFeatures(nn.Module):
    """An input with an empty feature dim concatenated to the features (B, T, 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)

    def forward(self, x, none_yet):
        return self.gru(torch.cat([x, none_yet], dim=2))[0]


class Windows(nn.Module):
    """Time folded into batch: windows of 3 steps, each through the GRU from zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(2, 8, num_layers=2, batch_first=True)

    def forward(self, x):
        B, T, F = x.shape
        pad = (-T) % 3
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        out, _ = self.gru(x.reshape(-1, 3, F))
        return out.reshape(B, T + pad, 8)[:, :T]


def _export_verify(tmp_path, module, example, **kw):
    path = tmp_path / "m.onnx"
    contract = export_module(module, example, path, name="m", **kw)
    report = verify_module(module, path, **QUICK)
    assert report.ok, report.summary()
    if contract.streamable and any(t.time_axis is not None for t in contract.inputs):
        B = 1 if any(isinstance(s.shape[s.batch_axis], int) for s in contract.states) else 3
        assert stream_through_ort(path, module, contract, B=B) <= 1e-5
    return contract, report, path


@pytest.mark.parametrize("batch", [1, 2])
def test_the_tutorial_forecaster_with_hidden_none_exports_and_streams(tmp_path, batch):
    module = Forecaster().eval()
    example = (torch.randn(batch, 5, 1), None)
    if batch == 1:
        c, _, _ = _export_verify(tmp_path, module, example)
        assert c.streamable and [s.output for s in c.states] == ["y_1"]
        # out.view(-1, H) is what PyTorch runs at batch 1 only: the graph's batch is fixed
        assert c.inputs[0].shape == [1, "time", 1] and c.states[0].shape == [1, 1, 10]
        return
    # At batch 2 nn.RNN(batch_first=True) returns a non-contiguous output in PyTorch itself
    # (strides (H, B*H, 1)), so the tutorial's .view fails before any export: said so.
    with pytest.raises(InvalidArgument, match=r"running the module on the example inputs.*view"):
        export_module(module, example, tmp_path / "m.onnx", name="m")


def test_a_state_passed_in_and_dropped_is_still_the_state_output(tmp_path):
    module = WordLanguageModel().eval()
    example = (torch.randint(0, 20, (5, 2)), (torch.zeros(2, 2, 8), torch.zeros(2, 2, 8)))
    c, _, _ = _export_verify(tmp_path, module, example)
    assert [(s.input, s.output) for s in c.states] == [
        ("hidden_0", "rnn_hn"),
        ("hidden_1", "rnn_cn"),
    ]


def test_the_users_layer_is_untouched_flatten_parameters_and_attributes_work(tmp_path):
    module = FlattensAndReads().eval()
    keys = list(module.state_dict())
    _export_verify(tmp_path, module, (torch.randn(2, 4, 3),))
    assert type(module.rnn) is nn.GRU and list(module.state_dict()) == keys
    # the module still copies, pickles and reloads as before
    clone = pickle.loads(pickle.dumps(copy.deepcopy(module)))
    clone.load_state_dict(module.state_dict())
    assert nn.GRU.forward.__qualname__ == "GRU.forward"  # nothing left patched


def test_a_cell_called_once_per_forward_exports_as_its_one_step_graph(tmp_path):
    module = OneCellStep().eval()
    c, _, path = _export_verify(tmp_path, module, tuple(torch.randn(2, n) for n in (3, 5, 5)))
    assert c.streamable and all(t.time_axis is None for t in c.inputs)
    assert [(s.input, s.output, s.shape) for s in c.states] == [
        ("h", "y_1", ["batch", 5]),
        ("c", "y_2", ["batch", 5]),
    ]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"LSTM", "Scan", "Loop"}


def test_a_python_loop_of_cells_keeps_its_pointer_to_export_step(tmp_path):
    with pytest.raises(InvalidArgument, match=r"called 4 times.*export_step"):
        export_module(LoopedCell(), (torch.randn(2, 4, 3),), tmp_path / "m.onnx", name="m")


def test_verify_starts_at_the_shortest_sequence_the_module_accepts(tmp_path):
    c, report, _ = _export_verify(tmp_path, ValidConv().eval(), (torch.randn(2, 6, 3),))
    assert not c.streamable and "fails on a chunk of 1 steps" in c.extra["streamable_reason"]
    assert any("shortest sequence the module accepts: T=3" in n for n in report.notes)
    assert min(case.time for case in report.cases) == 3


def test_the_last_steps_of_an_output_are_expressed_in_the_contract(tmp_path):
    c, report, _ = _export_verify(tmp_path, LastSteps().eval(), (torch.randn(2, 6, 3),))
    assert c.outputs[0].shape == ["batch", "min(time, 4)", 4]
    assert {case.time for case in report.cases} >= {1, 2, 7}  # shorter and longer than 4


def test_a_cumulative_normalisation_is_not_streamable_for_the_right_reason(tmp_path):
    c, _, _ = _export_verify(tmp_path, CumulativeNorm().eval(), (torch.randn(2, 6, 3),))
    assert not c.streamable
    reason = c.extra["streamable_reason"]
    assert "only on earlier steps" in reason and "later steps" not in reason


def test_an_empty_feature_dim_exports(tmp_path):
    c, _, _ = _export_verify(
        tmp_path, WithEmptyFeatures().eval(), (torch.randn(2, 6, 3), torch.randn(2, 6, 0))
    )
    assert c.inputs[1].shape == ["batch", "time", 0]


def test_time_folded_into_batch_keeps_its_state_inside_and_declares_no_wrong_batch(tmp_path):
    axes = {"x": {"batch": 0, "time": 1}}
    c, _, _ = _export_verify(tmp_path, Windows().eval(), (torch.randn(2, 6, 2),), axes=axes)
    assert c.states == [] and c.extra["calls"] == ["gru:internal"]
    assert "does not follow the inputs' batch" in " ".join(c.extra["lifting_notes"])


def test_an_internal_failure_names_the_stage_and_the_source_line(tmp_path):
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(3, 4, batch_first=True)

        def forward(self, x):
            return self.gru(x)[0] @ torch.ones(5, 2)  # 4 != 5

    with pytest.raises(InvalidArgument) as err:
        export_module(Broken(), (torch.randn(2, 6, 3),), tmp_path / "m.onnx", name="m")
    msg = str(err.value)
    assert "while running the module on the example inputs" in msg
    assert "test_export_wild.py" in msg and "torch.ones(5, 2)" in msg


class LengthsLSTM(nn.LSTM):
    """pytorch-forecasting's pattern: an nn.LSTM subclass packing by its own lengths= keyword."""

    def forward(self, x, hx=None, lengths=None, enforce_sorted=True):
        if lengths is None:
            return super().forward(x, hx)
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths.cpu(), batch_first=self.batch_first, enforce_sorted=enforce_sorted
        )
        out, h = super().forward(packed, hx)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=self.batch_first)[0], h


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = LengthsLSTM(3, 4, 1, batch_first=True)

    def forward(self, x, lengths):
        return self.rnn(x, lengths=lengths, enforce_sorted=False)[0]


class RelativeLengths(nn.Module):
    """speechbrain's pattern: lengths as fractions of the time axis, packed inside."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x, lengths):
        steps = torch.round(lengths * x.shape[1]).int()
        packed = nn.utils.rnn.pack_padded_sequence(
            x, steps.cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = nn.utils.rnn.pad_packed_sequence(
            self.rnn(packed)[0], batch_first=True, total_length=x.shape[1]
        )
        return out


@pytest.mark.parametrize(
    ("module", "lengths", "kind"),
    [
        (Encoder, torch.tensor([3, 6]), "steps"),
        (RelativeLengths, torch.tensor([0.5, 1.0]), "fraction"),
    ],
)
def test_lengths_given_to_a_packing_layer_become_a_graph_input(tmp_path, module, lengths, kind):
    c, _, path = _export_verify(tmp_path, module().eval(), (torch.randn(2, 6, 3), lengths))
    assert c.inputs[1].shape == ["batch"] and c.extra["lengths"] == {"lengths": kind}
    assert not c.streamable and "pack_padded_sequence" in c.extra["streamable_reason"]
    # the ONNX node takes them as sequence_lens; verify fed ragged lengths (one full length)
    lstm = next(n for n in onnx.load(str(path)).graph.node if n.op_type in ("LSTM", "GRU"))
    assert lstm.input[4]


def test_a_call_that_misses_a_required_argument_says_so_and_not_that_export_failed(tmp_path):
    with pytest.raises(InvalidArgument) as err:
        export_module(nn.GRU(2, 3), (torch.randn(1, 2, 2),), tmp_path / "m.onnx")  # no name=
    msg = str(err.value)
    assert "export_module() was called wrongly" in msg and "'name'" in msg
    assert "rnnzoo bug" not in msg
