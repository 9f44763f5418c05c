"""torch -> ONNX: every cell family, symbolic axes, native nodes / Scan loops, parity, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from rnnzoo.contract import read_contract
from rnnzoo.errors import InvalidArgument
from rnnzoo.export.graph import LOOP_OPS, NATIVE_OPS
from rnnzoo.export.onnx_export import export_model
from rnnzoo.export.verify import make_session, verify_net
from rnnzoo.models.rnn import CELLS, RecurrentNet, RNNConfig, Seq2Seq, Seq2SeqConfig

# (layers, bidirectional, token input): together they cover 1/2 layers, uni/bi, float/token.
SHAPES = [(1, False, False), (2, True, True)]
EXTRA = [("lstm", 2, False, True), ("gru_scratch", 2, False, False), ("rnn_relu", 2, False, True)]
CASES = [(c, *s) for c in CELLS for s in SHAPES] + EXTRA


def tiny_net(cell: str, layers: int, bidir: bool, tokens: bool, seed: int = 0) -> RecurrentNet:
    torch.manual_seed(seed)
    cfg = RNNConfig(
        cell=cell,
        hidden_size=6,
        num_layers=layers,
        bidirectional=bidir,
        input_size=3,
        vocab_size=11 if tokens else None,
        embed_size=5,
        output_size=4,
    )
    return RecurrentNet(cfg).eval()


def dims(v: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


@pytest.mark.parametrize(("cell", "layers", "bidir", "tokens"), CASES)
def test_export_graph_and_parity(tmp_path, cell, layers, bidir, tokens):
    net = tiny_net(cell, layers, bidir, tokens)
    [path] = export_model(net, tmp_path / "m.onnx", name="m")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17

    # I/O names per docs/design.md; batch and time symbolic everywhere, no stale dims.
    lstm = cell.startswith("lstm")
    in_names = ["tokens" if tokens else "x", "h0"] + (["c0"] if lstm else [])
    out_names = ["y", "hn"] + (["cn"] if lstm else [])
    assert [v.name for v in model.graph.input] == in_names
    assert [v.name for v in model.graph.output] == out_names
    D = 2 if bidir else 1
    for v in model.graph.input[:1]:
        assert dims(v)[:2] == ["batch", "time"], dims(v)
    assert dims(model.graph.output[0]) == ["batch", "time", 4]
    for v in [*model.graph.input[1:], *model.graph.output[1:]]:
        assert dims(v) == [layers * D, "batch", 6], (v.name, dims(v))

    ops = [n.op_type for n in model.graph.node]
    if cell.endswith("_scratch"):
        # Hand-written cells are loops over their own step, never mapped onto native ops.
        assert ops.count("Scan") == layers * D
        assert not set(ops) & NATIVE_OPS
    else:
        native = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "gru": "GRU", "lstm": "LSTM"}[cell]
        assert ops.count(native) == layers  # one node per layer, both directions inside
        assert not set(ops) & LOOP_OPS
        if bidir:
            for n in model.graph.node:
                if n.op_type == native:
                    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                    assert attrs["direction"] == b"bidirectional"

    c = read_contract(path)
    assert c.streamable is (not bidir)
    assert [s.input for s in c.states] == in_names[1:]
    assert [s.output for s in c.states] == out_names[1:]
    # Lengths and batch sizes never seen during export (it traced B=2, T=3), T=1 included.
    report = verify_net(net, path, times=(1, 2, 5, 33), batches=(1, 4), stream=(19, 2))
    assert report.ok, report.summary()
    assert any(x.mode.startswith("stream") for x in report.cases) is (not bidir)
    assert report.max_abs() < 1e-5


@pytest.mark.slow  # nine exports
def test_many_exports_in_one_process_each_still_dynamic(tmp_path):
    # REFERENCE.md: a second dynamo export of the same RNN type could break; ours must not.
    for i in range(3):
        for cell in ("lstm", "gru", "rnn_tanh"):
            net = tiny_net(cell, 2, False, False, seed=i)
            [p] = export_model(net, tmp_path / f"{cell}{i}.onnx", name=f"{cell}{i}")
            assert verify_net(net, p, times=(1, 9), batches=(3,), stream=None).ok


def test_seq2seq_pair_greedy_decode_matches_torch(tmp_path):
    torch.manual_seed(3)
    model = Seq2Seq(Seq2SeqConfig(cell="gru", hidden_size=8, src_vocab_size=10, tgt_vocab_size=7))
    model.eval()
    task = {
        "kind": "seq2seq",
        "vocab": [f"s{i}" for i in range(10)],
        "target_vocab": [f"t{i}" for i in range(7)],
        "special_tokens": {"pad": 0, "bos": 1, "eos": 2},
    }
    enc_p, dec_p = export_model(model, tmp_path / "pair.onnx", name="pair", task=task)
    assert (enc_p.name, dec_p.name) == ("pair.encoder.onnx", "pair.decoder.onnx")
    enc, dec = read_contract(enc_p), read_contract(dec_p)
    assert (enc.role, dec.role, enc.group, dec.group) == ("encoder", "decoder", "pair", "pair")
    assert [t.name for t in enc.inputs + enc.outputs] == ["tokens", "y"]
    assert [t.name for t in dec.inputs + dec.outputs] == ["tokens", "logits"]
    assert dec.special_tokens == {"pad": 0, "bos": 1, "eos": 2}
    assert enc.vocab == task["vocab"] and dec.target_vocab == task["target_vocab"]
    assert [s.output for s in enc.states] == [s.input.replace("0", "n") for s in dec.states]
    for net, p in ((model.encoder, enc_p), (model.decoder, dec_p)):
        assert verify_net(net, p, times=(1, 6), batches=(1, 3), stream=(12, 2)).ok

    # The serving loop, in ORT only: encode, then one decoder step per token.
    src = torch.randint(3, 10, (2, 5))
    want = model.greedy_decode(src, bos=1, eos=2, max_len=6)
    es, ds = make_session(enc_p), make_session(dec_p)
    _, h = es.run(None, {"tokens": src.numpy(), "h0": np.zeros((1, 2, 8), np.float32)})
    tok, got = np.full((2, 1), 1, np.int64), []
    for _ in range(want.shape[1]):
        logits, h = ds.run(None, {"tokens": tok, "h0": h})
        tok = logits.argmax(-1)
        got.append(tok)
    np.testing.assert_array_equal(np.concatenate(got, 1), want.numpy())


def test_contract_reads_back_without_torch(tmp_path):
    net = tiny_net("lstm", 1, False, False)
    [p] = export_model(net, tmp_path / "m.onnx", name="m", task={"kind": "forecast"})
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "from rnnzoo.contract import read_contract\n"
        f"c = read_contract({str(p)!r})\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(c.name, c.task, c.source['torch_version'], c.source['onnx_version'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    name, task, torch_v, onnx_v = out.stdout.split()
    assert (name, task, torch_v, onnx_v) == ("m", "forecast", torch.__version__, onnx.__version__)


def test_unsupported_features_are_named_before_anything_is_written(tmp_path):
    net = tiny_net("lstm", 1, False, False)
    net.rnn = nn.LSTM(3, 6, batch_first=True, proj_size=2)
    with pytest.raises(InvalidArgument, match="proj_size"):
        export_model(net, tmp_path / "p.onnx", name="p")
    net.rnn = nn.Linear(3, 6)
    with pytest.raises(InvalidArgument, match="Linear"):
        export_model(net, tmp_path / "u.onnx", name="u")
    net = tiny_net("gru", 1, False, False).double()
    with pytest.raises(InvalidArgument, match="float32"):
        export_model(net, tmp_path / "d.onnx", name="d")
    with pytest.raises(InvalidArgument, match="RecurrentNet and Seq2Seq"):
        export_model(nn.GRU(3, 4), tmp_path / "g.onnx", name="g")
    assert list(tmp_path.iterdir()) == []
