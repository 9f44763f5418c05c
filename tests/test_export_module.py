"""export_module / export_step / verify_module on a gallery of user-style modules.

Each module is exported, checked as a graph (opset, native nodes, symbolic batch/time
everywhere), verified by the parity engine and, where streamable, streamed through ONNX Runtime
in random chunks with the state carried, against the module itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from rnnzoo.contract import read_contract
from rnnzoo.errors import InvalidArgument
from rnnzoo.export import native
from rnnzoo.export.module_export import export_module
from rnnzoo.export.module_verify import eager_module, verify_module
from rnnzoo.export.sampling import make_sampler
from rnnzoo.export.step_export import export_step

QUICK = {"times": (1, 2, 7, 40), "batches": (1, 3), "stream": (40, 3)}
README = Path(__file__).resolve().parents[1] / "README.md"


# ---- the gallery: modules written the way users write them ---------------------------------


class TokenLSTM(nn.Module):
    """Embedding + 2-layer LSTM + LayerNorm + Dropout + Linear; no state in the signature."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 5)
        self.lstm = nn.LSTM(5, 8, num_layers=2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 13)

    def forward(self, tokens):
        out, _ = self.lstm(self.emb(tokens))
        return self.head(self.drop(self.norm(out)))


class BiGRUTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0])


class ReluRNN(nn.Module):
    """Time-major (the default layout), ReLU nonlinearity."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 7, nonlinearity="relu")
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


class LSTMThenGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.gru = nn.GRU(6, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        a, _ = self.lstm(x)
        b, _ = self.gru(a)
        return self.head(b)


class SideBySide(nn.Module):
    """An LSTM and a time-major ReLU RNN reading the same input, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.rnn = nn.RNN(4, 3, nonlinearity="relu")
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        a, _ = self.lstm(x)
        b, _ = self.rnn(x.transpose(0, 1))
        return self.head(torch.cat([a, b.transpose(0, 1)], dim=-1))


class SharedTwice(nn.Module):
    """One GRU called twice: each call gets its own state pair."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(5, 5, batch_first=True)
        self.mix = nn.Linear(5, 5)

    def forward(self, x):
        a, _ = self.gru(x)
        b, _ = self.gru(torch.tanh(self.mix(a)))
        return b


class ConvFrontGRU(nn.Module):
    """A per-step Conv1d (kernel 1) before a GRU."""

    def __init__(self, kernel: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, kernel_size=kernel, padding=kernel // 2)
        self.gru = nn.GRU(6, 5, batch_first=True)

    def forward(self, x):  # x: (B, T, 4)
        feats = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.gru(feats)[0]


class LSTMWithState(nn.Module):
    """Returns (out, (h, c)) and takes the state as an optional argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)

    def forward(self, x, hx=None):
        return self.lstm(x, hx)


class LastStepClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TutorialZeroState(nn.Module):
    """The tutorials' pattern: zero initial states made inside forward (lifted as zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_layers, self.hidden = 2, 6
        self.lstm = nn.LSTM(3, 6, num_layers=2, batch_first=True)
        self.fc = nn.Linear(6, 1)

    def forward(self, x):
        h0 = torch.zeros(self.num_layers, x.size(0), self.hidden)
        c0 = torch.zeros(self.num_layers, x.size(0), self.hidden)
        out, _ = self.lstm(x, (h0, c0))
        return self.fc(out)


class ScratchGRUStep(nn.Module):
    """The seeds' from-scratch GRU: a GRU cell from plain parameters, one step per call."""

    def __init__(self, F: int = 3, H: int = 5) -> None:
        super().__init__()
        k = H**-0.5
        self.w_ih = nn.Parameter(torch.empty(3 * H, F).uniform_(-k, k))
        self.w_hh = nn.Parameter(torch.empty(3 * H, H).uniform_(-k, k))
        self.b_ih = nn.Parameter(torch.empty(3 * H).uniform_(-k, k))
        self.b_hh = nn.Parameter(torch.empty(3 * H).uniform_(-k, k))

    def forward(self, x, h):
        ir, iz, i_n = (x @ self.w_ih.T + self.b_ih).chunk(3, dim=1)
        hr, hz, h_n = (h @ self.w_hh.T + self.b_hh).chunk(3, dim=1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * h_n)
        h = (1 - z) * n + z * h
        return h, h


def _case(name):
    torch.manual_seed(0)
    B, T = 2, 5
    if name == "rnn1_time_major_h0":
        return (
            nn.RNN(5, 6, 1),
            (torch.randn(T, B, 5), torch.randn(1, B, 6)),
            {"input_names": ["x", "h0"], "output_names": ["y", "hn"]},
        )
    if name == "rnn2_time_major_h0":
        return (
            nn.RNN(5, 6, 2),
            (torch.randn(T, B, 5), torch.randn(2, B, 6)),
            {"input_names": ["x", "h0"], "output_names": ["y", "hn"]},
        )
    if name == "embedding_lstm2_linear":
        return TokenLSTM(), (torch.randint(0, 13, (B, T)),), {"output_names": ["logits"]}
    if name == "bigru_tagger":
        return BiGRUTagger(), (torch.randn(B, T, 4),), {}
    if name == "relu_rnn":
        return ReluRNN(), (torch.randn(T, B, 3),), {}
    if name == "lstm_then_gru":
        return LSTMThenGRU(), (torch.randn(B, T, 4),), {}
    if name == "side_by_side":
        return SideBySide(), (torch.randn(B, T, 4),), {}
    if name == "shared_twice":
        return SharedTwice(), (torch.randn(B, T, 5),), {}
    if name == "conv1_gru":
        return ConvFrontGRU(), (torch.randn(B, T, 4),), {}
    if name == "lstm_returns_state":
        return LSTMWithState(), (torch.randn(B, T, 3),), {"output_names": ["y", "hn", "cn"]}
    if name == "lstm_takes_state":
        h0, c0 = torch.randn(2, B, 4), torch.randn(2, B, 4)
        return (
            LSTMWithState(),
            (torch.randn(B, T, 3), (h0, c0)),
            {"input_names": ["x", "h0", "c0"], "output_names": ["y", "hn", "cn"]},
        )
    if name == "tutorial_zero_state":
        return TutorialZeroState(), (torch.randn(B, T, 3),), {}
    if name == "last_step_classifier":
        return LastStepClassifier(), (torch.randn(B, T, 4),), {"output_names": ["logits"]}
    raise KeyError(name)


STREAMABLE = {
    "rnn1_time_major_h0": True,
    "rnn2_time_major_h0": True,
    "embedding_lstm2_linear": True,
    "bigru_tagger": False,
    "relu_rnn": True,
    "lstm_then_gru": True,
    "side_by_side": True,
    "shared_twice": True,
    "conv1_gru": True,
    "lstm_returns_state": True,
    "lstm_takes_state": True,
    "last_step_classifier": False,
    "tutorial_zero_state": True,
}


def dims(v: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


def stream_through_ort(path, module, contract, seed=1, T=37, B=3) -> float:
    """Random chunks through ORT with the state carried vs the module's whole-sequence run."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    xs, states = make_sampler(contract)(B, T, gen)
    with torch.no_grad():
        ref = eager_module(module, contract)(*xs, *states)
    in_names = [t.name for t in contract.inputs]
    st = {s.input: s0.numpy() for s, s0 in zip(contract.states, states, strict=True)}
    pieces, pos = [], 0
    while pos < T:
        n = min(T - pos, int(torch.randint(1, 9, (1,), generator=gen)))
        feeds = {
            name: x.narrow(spec.time_axis, pos, n).numpy()
            for name, x, spec in zip(in_names, xs, contract.inputs, strict=True)
        }
        got = sess.run(None, {**feeds, **st})
        pieces.append(got[: len(contract.outputs)])
        st = {
            s.input: v for s, v in zip(contract.states, got[len(contract.outputs) :], strict=True)
        }
        pos += n
    worst = 0.0
    for i, spec in enumerate(contract.outputs):
        whole = np.concatenate([p[i] for p in pieces], axis=spec.time_axis)
        worst = max(worst, float(np.abs(whole - ref[i].numpy()).max()))
    for j, s in enumerate(contract.states):
        worst = max(
            worst, float(np.abs(st[s.input] - ref[len(contract.outputs) + j].numpy()).max())
        )
    return worst


@pytest.mark.parametrize("case", sorted(STREAMABLE))
def test_gallery_module_exports_verifies_and_streams(tmp_path, case):
    module, example, kw = _case(case)
    path = tmp_path / f"{case}.onnx"
    contract = export_module(module, example, path, name=case, **kw)

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"RNN", "GRU", "LSTM"} and not ops & {"Scan", "Loop"}
    assert read_contract(path) == contract
    # Batch and time symbolic in every input, output and declared value shape; no stale size.
    for v in [*model.graph.input, *model.graph.output]:
        spec = next(
            (t.shape for t in [*contract.inputs, *contract.outputs] if t.name == v.name), None
        ) or next(s.shape for s in contract.states if v.name in (s.input, s.output))
        assert dims(v) == spec, v.name
    # Inferred value shapes: the exporter traced at sizes colliding with no fixed dim and
    # refused any intermediate holding them; here, no value may declare the example's length.
    T = 5
    fixed = {d for p in module.parameters() for d in p.shape}
    for v in model.graph.value_info:
        assert T in fixed or T not in dims(v), (v.name, dims(v))
    assert contract.streamable is STREAMABLE[case], contract.extra["streamable_reason"]

    report = verify_module(module, path, **QUICK)
    assert report.ok, report.summary()
    if contract.streamable:
        assert stream_through_ort(path, module, contract) <= 1e-5


def test_time_major_rnn_keeps_the_callers_state_io_and_layout(tmp_path):
    module, example, kw = _case("rnn2_time_major_h0")
    c = export_module(module, example, tmp_path / "m.onnx", name="m", **kw)
    assert [t.name for t in c.inputs] == ["x"] and [t.name for t in c.outputs] == ["y"]
    assert [(s.input, s.output, s.shape) for s in c.states] == [("h0", "hn", [2, "batch", 6])]
    assert c.inputs[0].shape == ["time", "batch", 5]
    assert (c.inputs[0].batch_axis, c.inputs[0].time_axis) == (1, 0)


def test_stateless_forward_gets_lifted_state_pairs(tmp_path):
    module, example, kw = _case("embedding_lstm2_linear")
    c = export_module(module, example, tmp_path / "m.onnx", name="m", **kw)
    assert [(s.input, s.output) for s in c.states] == [
        ("lstm_h0", "lstm_hn"),
        ("lstm_c0", "lstm_cn"),
    ]
    assert c.extra["int_high"] == {"tokens": 13}


def test_shared_layer_called_twice_gets_one_state_pair_per_call(tmp_path):
    module, example, _ = _case("shared_twice")
    c = export_module(module, example, tmp_path / "m.onnx", name="m")
    assert [s.input for s in c.states] == ["gru_call1_h0", "gru_call2_h0"]


def test_returned_state_becomes_the_state_output(tmp_path):
    module, example, kw = _case("lstm_returns_state")
    c = export_module(module, example, tmp_path / "m.onnx", name="m", **kw)
    assert [(s.input, s.output) for s in c.states] == [("lstm_h0", "hn"), ("lstm_c0", "cn")]
    assert [t.name for t in c.outputs] == ["y"]


@pytest.mark.parametrize(
    ("module", "words"),
    [
        (BiGRUTagger(), "bidirectional layer 'gru'"),
        (ConvFrontGRU(kernel=3), "Conv1d with kernel 3"),
        (LastStepClassifier(), "no time axis"),
    ],
)
def test_non_streamable_modules_say_why(tmp_path, module, words):
    c = export_module(module.eval(), (torch.randn(2, 5, 4),), tmp_path / "m.onnx", name="m")
    assert not c.streamable
    assert words in c.extra["streamable_reason"]


def test_axes_named_by_the_caller_override_inference(tmp_path):
    torch.manual_seed(0)
    m = nn.GRU(3, 4)  # time-major: (T, B, F)
    c = export_module(
        m,
        (torch.randn(6, 2, 3),),
        tmp_path / "m.onnx",
        name="m",
        axes={"x": {"batch": 1, "time": 0}},
        input_names=["x"],
        output_names=["y", "hn"],
    )
    assert c.inputs[0].shape == ["time", "batch", 3]
    assert verify_module(m, tmp_path / "m.onnx", **QUICK).ok


def test_from_scratch_gru_step_exports_as_a_scan_and_as_one_step(tmp_path):
    torch.manual_seed(0)
    step = ScratchGRUStep()
    example = (torch.randn(2, 3), torch.zeros(2, 5))
    c = export_step(step, example, tmp_path / "scan.onnx", name="gru-step")
    assert c.streamable and [t.shape for t in c.inputs] == [["batch", "time", 3]]
    assert [(s.input, s.output) for s in c.states] == [("h0", "hn")]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "scan.onnx")).graph.node}
    assert "Scan" in ops
    report = verify_module(step, tmp_path / "scan.onnx", **QUICK)
    assert report.ok, report.summary()
    assert stream_through_ort(tmp_path / "scan.onnx", step, c) <= 1e-5

    c1 = export_step(step, example, tmp_path / "one.onnx", name="gru-step", mode="step")
    assert c1.inputs[0].shape == ["batch", 3] and c1.inputs[0].time_axis is None
    assert verify_module(step, tmp_path / "one.onnx", **QUICK).ok


def test_a_wrong_gate_order_in_the_exporter_is_caught_by_verify(tmp_path, monkeypatch):
    module, example, kw = _case("embedding_lstm2_linear")
    monkeypatch.setitem(native.GATE_ORDER, "LSTM", [0, 1, 2, 3])  # PyTorch's order, unconverted
    export_module(module, example, tmp_path / "m.onnx", name="m", **kw)
    report = verify_module(module, tmp_path / "m.onnx", **QUICK)
    assert not report.ok and report.failures


# ---- what ONNX cannot express: clear errors naming the layer and the fix ---------------------


class Projected(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.LSTM(3, 6, proj_size=2, batch_first=True)

    def forward(self, x):
        return self.enc(x)[0]


class CellLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(3, 4)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[0], 4)
        outs = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            outs.append(h)
        return torch.stack(outs, 1)


class Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        return self.gru(packed)[1]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        out, _ = self.gru(x)
        if out.sum() > 0:  # control flow on a tensor's value
            return out * 2
        return out


def test_proj_size_is_refused_naming_the_layer_and_the_fix(tmp_path):
    with pytest.raises(InvalidArgument, match=r"layer 'enc'.*proj_size=2.*Fix: retrain"):
        export_module(Projected(), (torch.randn(2, 5, 3),), tmp_path / "m.onnx", name="m")
    assert not (tmp_path / "m.onnx").exists()


def test_a_cell_driven_by_a_python_loop_points_to_export_step(tmp_path):
    with pytest.raises(InvalidArgument, match=r"layer 'cell'.*called 5 times.*export_step"):
        export_module(CellLoop(), (torch.randn(2, 5, 3),), tmp_path / "m.onnx", name="m")


def test_a_packing_encoder_that_returns_only_its_final_state_exports(tmp_path):
    module = Packed().eval()
    c = export_module(module, (torch.randn(2, 5, 3),), tmp_path / "m.onnx", name="m")
    assert c.outputs[0].shape == [1, "batch", 4] and [s.output for s in c.states] == ["gru_hn"]
    assert verify_module(module, tmp_path / "m.onnx", **QUICK).ok


def test_data_dependent_control_flow_names_the_source_line(tmp_path):
    with pytest.raises(InvalidArgument) as exc:
        export_module(DataDependent(), (torch.randn(2, 5, 3),), tmp_path / "m.onnx", name="m")
    msg = str(exc.value)
    assert "control flow depends on tensor values" in msg, msg
    assert re.search(r"test_export_module\.py:\d+ \(`if out\.sum\(\) > 0:", msg), msg
    assert "\n" not in msg


def test_readme_export_example_runs(tmp_path, monkeypatch):
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python export\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert (tmp_path / "tagger.onnx").exists()


FACTORY = """
import torch
from torch import nn


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 8)  # time-major
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0])


def make():
    torch.manual_seed(0)
    return {"module": Tagger().eval(), "example_inputs": (torch.randn(5, 2, 4),),
            "output_names": ["logits"], "task": "tag"}
"""


def test_cli_exports_a_factory_module_and_verifies_it_from_the_recorded_factory(
    tmp_path, monkeypatch, capsys
):
    from rnnzoo.cli import main

    (tmp_path / "user_models_cli.py").write_text(FACTORY, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "tagger.onnx"
    assert main(["export", "--factory", "user_models_cli:make", str(out), "--no-verify"]) == 0
    c = read_contract(out)
    assert c.name == "tagger" and c.source["factory"] == "user_models_cli:make"
    assert c.inputs[0].shape == ["time", "batch", 4]
    assert main(["verify", str(out), "--quick"]) == 0
    assert "0 failing" in capsys.readouterr().out
    assert main(["export", "--factory", "user_models_cli:nope", str(out)]) == 2
