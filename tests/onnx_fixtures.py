"""Small ONNX test models built with onnx.helper, plus a numpy reference for each.

The graphs follow the rnnzoo conventions (docs/design.md): batch-major data tensors,
native ONNX ``LSTM``/``GRU``/``RNN`` nodes (time-major inside, transposed at the edges),
states ``(L*D, batch, H)`` with the batch on axis 1. ``build_external`` builds a model that
breaks those conventions (batch-major state, a constant input) and carries only a sidecar.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rnnzoo.contract import (
    CONTRACT_KEY,
    ConstantInput,
    Contract,
    StateSpec,
    TensorSpec,
    sidecar_path,
)

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
OPSET = 17


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


class _Builder:
    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base: str, value: np.ndarray) -> str:
        nm = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), nm))
        return nm

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs


def make_params(
    cell: str, in_size: int, hidden: int, layers: int, bidir: bool, seed: int
) -> list[dict]:
    """Per layer: W (D, G*H, I), R (D, G*H, H), B (D, 2*G*H), in ONNX gate order."""
    rng = np.random.default_rng(seed)
    d, g = (2 if bidir else 1), GATES[cell]
    out = []
    for layer in range(layers):
        i = in_size if layer == 0 else d * hidden
        s = 1.0 / np.sqrt(hidden)
        out.append(
            {
                "W": rng.uniform(-s, s, (d, g * hidden, i)).astype(np.float32),
                "R": rng.uniform(-s, s, (d, g * hidden, hidden)).astype(np.float32),
                "B": rng.uniform(-s, s, (d, 2 * g * hidden)).astype(np.float32),
            }
        )
    return out


def _recurrent_stack(
    b: _Builder, x_tbf: str, cell: str, params: list[dict], hidden: int, bidir: bool, h0: str, c0
) -> tuple[str, list[str], list[str]]:
    """Time-major input (T, B, I) -> top outputs (T, B, D*H), per-layer Y_h and Y_c."""
    d = 2 if bidir else 1
    cur, hs, cs = x_tbf, [], []
    for layer, p in enumerate(params):
        starts, ends, axes = (
            b.const("s", np.array([layer * d], np.int64)),
            b.const("e", np.array([(layer + 1) * d], np.int64)),
            b.const("a", np.array([0], np.int64)),
        )
        h_l = b.node("Slice", [h0, starts, ends, axes])[0]  # (D, B, H)
        ins = [cur, b.const("W", p["W"]), b.const("R", p["R"]), b.const("B", p["B"]), "", h_l]
        if cell == "lstm":
            ins.append(b.node("Slice", [c0, starts, ends, axes])[0])
        attrs = {"hidden_size": hidden, "direction": "bidirectional" if bidir else "forward"}
        if cell == "gru":
            attrs["linear_before_reset"] = 1
        outs = b.node(OPS[cell], ins, n_out=3 if cell == "lstm" else 2, **attrs)
        y = b.node("Transpose", [outs[0]], perm=[0, 2, 1, 3])[0]  # (T, B, D, H)
        cur = b.node("Reshape", [y, b.const("shape", np.array([0, 0, -1], np.int64))])[0]
        hs.append(outs[1])
        if cell == "lstm":
            cs.append(outs[2])
    return cur, hs, cs


def _save(model: onnx.ModelProto, path: Path, contract: Contract, sidecar: bool) -> Path:
    if sidecar:
        sidecar_path(path).write_text(json.dumps(asdict(contract)), encoding="utf-8")
    else:
        helper.set_model_props(model, {CONTRACT_KEY: contract.to_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_rnn(
    path: str | Path,
    *,
    cell: str = "lstm",
    input_size: int = 3,
    hidden: int = 8,
    layers: int = 1,
    bidirectional: bool = False,
    output_size: int = 2,
    vocab: list[str] | None = None,
    embed: int = 5,
    seed: int = 0,
    name: str | None = None,
    task: str | None = None,
    role: str = "model",
    group: str | None = None,
    extra_contract: dict | None = None,
    sidecar: bool = False,
    head_scale: float = 0.5,
    head_bias: np.ndarray | None = None,
) -> dict:
    """A recurrent model. Returns the parameters that ``reference`` needs.

    ``vocab`` set: input ``tokens`` (B, T) int64 through a Gather embedding, head ``logits``.
    ``output_size=0``: no head; ``y`` is the top hidden states (B, T, D*H) (an encoder).
    """
    path = Path(path)
    rng = np.random.default_rng(seed + 1000)
    d = 2 if bidirectional else 1
    b = _Builder()
    tokens = vocab is not None
    in_name = "tokens" if tokens else "x"
    out_name = "logits" if tokens and output_size else "y"
    emb = rng.normal(0, 1, (len(vocab), embed)).astype(np.float32) if tokens else None
    feat = embed if tokens else input_size
    params = make_params(cell, feat, hidden, layers, bidirectional, seed)
    x_btf = b.node("Gather", [b.const("emb", emb), in_name], axis=0)[0] if tokens else in_name
    x_tbf = b.node("Transpose", [x_btf], perm=[1, 0, 2])[0]
    top, hs, cs = _recurrent_stack(
        b, x_tbf, cell, params, hidden, bidirectional, "h0", "c0" if cell == "lstm" else None
    )
    top_btf = b.node("Transpose", [top], perm=[1, 0, 2])[0]  # (B, T, D*H)
    head = None
    if output_size:
        head = {
            "W": rng.normal(0, head_scale, (d * hidden, output_size)).astype(np.float32),
            "b": rng.normal(0, 0.1, (output_size,)).astype(np.float32),
        }
        if head_bias is not None:
            head["b"] = (head["b"] + head_bias).astype(np.float32)
        mm = b.node("MatMul", [top_btf, b.const("Wout", head["W"])])[0]
        b.nodes.append(helper.make_node("Add", [mm, b.const("bout", head["b"])], [out_name]))
    else:
        b.nodes.append(helper.make_node("Identity", [top_btf], [out_name]))
    b.nodes.append(helper.make_node("Concat", hs, ["hn"], axis=0))
    if cell == "lstm":
        b.nodes.append(helper.make_node("Concat", cs, ["cn"], axis=0))

    ld = layers * d
    width = output_size or d * hidden
    if tokens:
        g_in = [helper.make_tensor_value_info(in_name, TensorProto.INT64, ["batch", "time"])]
    else:
        g_in = [
            helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", "time", input_size])
        ]
    g_out = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", "time", width])]
    state_names = [("h0", "hn")] + ([("c0", "cn")] if cell == "lstm" else [])
    for si, so in state_names:
        g_in.append(helper.make_tensor_value_info(si, TensorProto.FLOAT, [ld, "batch", hidden]))
        g_out.append(helper.make_tensor_value_info(so, TensorProto.FLOAT, [ld, "batch", hidden]))
    graph = helper.make_graph(b.nodes, name or path.stem, g_in, g_out, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9

    in_spec = (
        TensorSpec(in_name, "int64", ["batch", "time"])
        if tokens
        else TensorSpec(in_name, "float32", ["batch", "time", input_size])
    )
    kw = dict(
        name=name or path.stem.split(".")[0],
        task=task or ("lm" if tokens else "forecast"),
        inputs=[in_spec],
        outputs=[TensorSpec(out_name, "float32", ["batch", "time", width])],
        states=[StateSpec(si, so, "float32", [ld, "batch", hidden]) for si, so in state_names],
        streamable=not bidirectional,
        role=role,
        group=group,
        vocab=vocab,
    )
    kw.update(extra_contract or {})
    _save(model, path, Contract(**kw), sidecar)
    return {
        "cell": cell,
        "params": params,
        "head": head,
        "emb": emb,
        "hidden": hidden,
        "bidir": bidirectional,
        "layers": layers,
    }


# ---- numpy reference (ONNX semantics) ----------------------------------------------------
def _cell_seq(cell: str, x: np.ndarray, W, R, B, h, c, hidden: int):
    """One direction over time. x (T, N, I), h/c (N, H) -> ys (T, N, H), h, c."""
    g = GATES[cell]
    wb, rb = B[: g * hidden], B[g * hidden :]
    ys = []
    for t in range(x.shape[0]):
        xw = x[t] @ W.T + wb
        hr = h @ R.T + rb
        if cell == "lstm":
            i, o, f, cc = (
                xw[:, k * hidden : (k + 1) * hidden] + hr[:, k * hidden : (k + 1) * hidden]
                for k in range(4)
            )
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(cc)
            h = _sigmoid(o) * np.tanh(c)
        elif cell == "gru":
            z = _sigmoid(xw[:, :hidden] + hr[:, :hidden])
            r = _sigmoid(xw[:, hidden : 2 * hidden] + hr[:, hidden : 2 * hidden])
            n = np.tanh(xw[:, 2 * hidden :] + r * hr[:, 2 * hidden :])
            h = (1 - z) * n + z * h
        else:
            h = np.tanh(xw + hr)
        ys.append(h)
    return np.stack(ys), h, c


def reference(m: dict, inputs: np.ndarray, state: dict | None = None):
    """Whole-sequence forward in float64. inputs (B, T, F) or tokens (B, T).

    Returns (out (B, T, O), {"hn": ..., "cn": ...}) like the graph.
    """
    hidden, d = m["hidden"], (2 if m["bidir"] else 1)
    x = m["emb"][inputs] if m["emb"] is not None else inputs
    x = np.transpose(x.astype(np.float64), (1, 0, 2))  # (T, B, F)
    bsz = x.shape[1]
    ld = m["layers"] * d
    h0 = np.zeros((ld, bsz, hidden)) if state is None else state["h0"].astype(np.float64)
    c0 = np.zeros((ld, bsz, hidden)) if state is None or "c0" not in state else state["c0"]
    hn, cn = [], []
    for layer, p in enumerate(m["params"]):
        outs = []
        for k in range(d):
            idx = layer * d + k
            xin = x if k == 0 else x[::-1]
            ys, h, c = _cell_seq(
                m["cell"], xin, p["W"][k], p["R"][k], p["B"][k], h0[idx], c0[idx], hidden
            )
            outs.append(ys if k == 0 else ys[::-1])
            hn.append(h)
            cn.append(c)
        x = np.concatenate(outs, axis=-1)  # (T, B, D*H)
    top = np.transpose(x, (1, 0, 2))
    out = top @ m["head"]["W"] + m["head"]["b"] if m["head"] is not None else top
    states = {"hn": np.stack(hn)}
    if m["cell"] == "lstm":
        states["cn"] = np.stack(cn)
    return out, states


# ---- named fixtures -----------------------------------------------------------------------
CHARS = list("abcdefgh ")


def build_zoo(model_dir: str | Path) -> dict[str, dict]:
    """The set of models the runtime tests serve. Returns name -> reference params."""
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    refs = {
        "lstm2": build_rnn(d / "lstm2.onnx", cell="lstm", layers=2, seed=1),
        "gru": build_rnn(d / "gru.onnx", cell="gru", seed=2),
        "rnn": build_rnn(d / "rnn.onnx", cell="rnn", seed=3),
        "bigru": build_rnn(d / "bigru.onnx", cell="gru", bidirectional=True, layers=2, seed=4),
        "charlm": build_rnn(
            d / "charlm.onnx", cell="lstm", vocab=CHARS, output_size=len(CHARS), seed=5
        ),
    }
    refs.update(build_seq2seq(d, "rev"))
    refs["kws"] = build_external(d / "kws.onnx")
    return refs


def build_seq2seq(d: Path, name: str, hidden: int = 6) -> dict[str, dict]:
    """``NAME.encoder.onnx`` + ``NAME.decoder.onnx`` (GRU, chars -> "abcd" with bos/eos)."""
    special = {"pad": 0, "bos": 1, "eos": 2}
    tgt = ["<pad>", "<bos>", "<eos>", *list("abcd")]
    enc = build_rnn(
        d / f"{name}.encoder.onnx",
        cell="gru",
        vocab=CHARS,
        output_size=0,
        hidden=hidden,
        seed=11,
        name=f"{name}.encoder",
        task="seq2seq",
        role="encoder",
        group=name,
        extra_contract={"special_tokens": special},
    )
    dec = build_rnn(
        d / f"{name}.decoder.onnx",
        cell="gru",
        vocab=tgt,
        output_size=len(tgt),
        hidden=hidden,
        seed=12,
        name=f"{name}.decoder",
        task="seq2seq",
        role="decoder",
        group=name,
        extra_contract={"special_tokens": special, "target_vocab": tgt},
        head_scale=2.0,
        head_bias=np.array([-4, -4, 0, 0, 0, 0, 0], np.float32),
    )
    return {f"{name}.encoder": enc, f"{name}.decoder": dec}


def build_external(path: Path, features: int = 4, hidden: int = 5, init: float = 0.25) -> dict:
    """A model "exported elsewhere": batch-major state (B, 1, H), a sample-rate constant
    input that scales the features, an init value; served from its sidecar alone."""
    b = _Builder()
    params = make_params("gru", features, hidden, 1, False, seed=21)
    rate = b.node("Cast", ["sample_rate"], to=TensorProto.FLOAT)[0]
    scale = b.node("Div", [rate, b.const("ref", np.array(16000.0, np.float32))])[0]
    xs = b.node("Mul", ["features", scale])[0]
    x_tbf = b.node("Transpose", [xs], perm=[1, 0, 2])[0]
    h0 = b.node("Transpose", ["state_in"], perm=[1, 0, 2])[0]  # (1, B, H)
    p = params[0]
    y, hn = b.node(
        "GRU",
        [x_tbf, b.const("W", p["W"]), b.const("R", p["R"]), b.const("B", p["B"]), "", h0],
        n_out=2,
        hidden_size=hidden,
        linear_before_reset=1,
    )
    y = b.node("Squeeze", [y, b.const("ax", np.array([1], np.int64))])[0]  # (T, B, H)
    b.nodes.append(helper.make_node("Transpose", [y], ["scores"], perm=[1, 0, 2]))
    b.nodes.append(helper.make_node("Transpose", [hn], ["state_out"], perm=[1, 0, 2]))
    g_in = [
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", "T", features]),
        helper.make_tensor_value_info("state_in", TensorProto.FLOAT, ["N", 1, hidden]),
        helper.make_tensor_value_info("sample_rate", TensorProto.INT64, []),
    ]
    g_out = [
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", "T", hidden]),
        helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["N", 1, hidden]),
    ]
    graph = helper.make_graph(b.nodes, "kws", g_in, g_out, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    contract = Contract(
        name="kws",
        task="classify",
        inputs=[TensorSpec("features", "float32", ["batch", "time", features])],
        outputs=[TensorSpec("scores", "float32", ["batch", "time", hidden])],
        states=[
            StateSpec(
                "state_in",
                "state_out",
                "float32",
                ["batch", 1, hidden],
                batch_axis=0,
                init="value",
                init_value=[[init] * hidden],
            )
        ],
        constants=[ConstantInput("sample_rate", "int64", 8000)],
    )
    _save(model, path, contract, sidecar=True)
    m = {"cell": "gru", "params": params, "head": None, "emb": None, "hidden": hidden}
    return {**m, "bidir": False, "layers": 1, "scale": 0.5, "init": init}


def reference_external(m: dict, x: np.ndarray, state: np.ndarray | None = None):
    """x (B, T, F); state (B, 1, H) -> scores (B, T, H), state (B, 1, H)."""
    bsz = x.shape[0]
    h = np.full((bsz, 1, m["hidden"]), m["init"]) if state is None else state
    out, st = reference(m, x * m["scale"], {"h0": np.transpose(h, (1, 0, 2))})
    return out, np.transpose(st["hn"], (1, 0, 2))
