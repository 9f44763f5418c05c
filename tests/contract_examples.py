"""Graphs for the worked examples of docs/contract.md, built from the examples' own JSON.

``doc_example(tag)`` reads the ```json block tagged ``tag`` from docs/contract.md;
``build_vad`` and ``build_kws`` build an ONNX graph (onnx.helper) that the contract
describes, so the tests serve exactly what the docs show:

- ``vad``: a streaming voice-activity model. A strided Conv front-end reads
  ``context_steps + hop`` samples per frame (kernel 2K, stride K = hop), so each chunk needs the
  last K samples of the previous one; a GRU carries a ``(1, batch, H)`` state across chunks.
  Outputs: ``prob`` per hop, ``chunk_prob`` once per chunk (``time_axis: null``), ``level``
  per input sample, context included (``drop_leading_steps: K``).
- ``kws``: a keyword spotter exported elsewhere, batch-major state ``(batch, 1, H)`` and a
  0-d ``sample_rate`` constant input.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx_fixtures import OPSET, _Builder, make_params

from rnnzoo.contract import sidecar_path

DOC = Path(__file__).resolve().parents[1] / "docs" / "contract.md"


def doc_example(tag: str) -> dict:
    """The JSON of the ```json block whose info string ends with ``tag``."""
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"```json " + re.escape(tag) + r"\n(.*?)```", text, re.S)
    assert m, f"docs/contract.md has no ```json {tag} block"
    return json.loads(m.group(1))


def _model(b: _Builder, name: str, g_in: list, g_out: list) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, name, g_in, g_out, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _save(model: onnx.ModelProto, path: Path, contract: dict | None) -> Path:
    onnx.save(model, str(path))
    if contract is not None:
        sidecar_path(path).write_text(json.dumps(contract), encoding="utf-8")
    return path


def build_vad(path: str | Path, contract: dict, seed: int = 0, sidecar: bool = True) -> Path:
    path = Path(path)
    k = contract["inputs"][0]["context_steps"]
    layers, _, hidden = contract["states"][0]["shape"]
    assert layers == 1
    channels = 8
    rng = np.random.default_rng(seed)
    b = _Builder()
    a = b.node("Unsqueeze", ["audio", b.const("ax1", np.array([1], np.int64))])[0]  # (B,1,K+T)
    w = rng.normal(0, 0.3, (channels, 1, 2 * k)).astype(np.float32)
    f = b.node(
        "Conv",
        [a, b.const("cw", w), b.const("cb", rng.normal(0, 0.1, channels).astype(np.float32))],
        kernel_shape=[2 * k],
        strides=[k],
    )[0]
    f = b.node("Relu", [f])[0]  # (B, C, T/K)
    ftb = b.node("Transpose", [f], perm=[2, 0, 1])[0]  # (F, B, C)
    p = make_params("gru", channels, hidden, 1, False, seed + 1)[0]
    y, hn = b.node(
        "GRU",
        [ftb, b.const("W", p["W"]), b.const("R", p["R"]), b.const("B", p["B"]), "", "state"],
        n_out=2,
        hidden_size=hidden,
        linear_before_reset=1,
    )
    y = b.node("Squeeze", [y, b.const("ax", np.array([1], np.int64))])[0]  # (F, B, H)
    head = rng.normal(0, 0.5, (hidden,)).astype(np.float32)
    logit = b.node("MatMul", [y, b.const("head", head)])[0]  # (F, B)
    prob = b.node("Sigmoid", [b.node("Transpose", [logit], perm=[1, 0])[0]])[0]
    b.nodes.append(helper.make_node("Identity", [prob], ["prob"]))
    b.nodes.append(helper.make_node("ReduceMax", [prob], ["chunk_prob"], axes=[1], keepdims=1))
    b.nodes.append(helper.make_node("Abs", ["audio"], ["level"]))
    b.nodes.append(helper.make_node("Identity", [hn], ["stateN"]))
    f32 = TensorProto.FLOAT
    g_in = [
        helper.make_tensor_value_info("audio", f32, ["batch", "samples"]),
        helper.make_tensor_value_info("state", f32, [1, "batch", hidden]),
    ]
    g_out = [
        helper.make_tensor_value_info("prob", f32, ["batch", "frames"]),
        helper.make_tensor_value_info("chunk_prob", f32, ["batch", 1]),
        helper.make_tensor_value_info("level", f32, ["batch", "samples"]),
        helper.make_tensor_value_info("stateN", f32, [1, "batch", hidden]),
    ]
    return _save(_model(b, "vad", g_in, g_out), path, contract if sidecar else None)


def build_kws(path: str | Path, contract: dict, seed: int = 0, sidecar: bool = True) -> Path:
    path = Path(path)
    feats = contract["inputs"][0]["shape"][2]
    classes = contract["outputs"][0]["shape"][2]
    hidden = contract["states"][0]["shape"][2]
    rng = np.random.default_rng(seed)
    b = _Builder()
    rate = b.node("Cast", ["sample_rate"], to=TensorProto.FLOAT)[0]
    scale = b.node("Div", [rate, b.const("ref", np.array(16000.0, np.float32))])[0]
    x = b.node("Transpose", [b.node("Mul", ["features", scale])[0]], perm=[1, 0, 2])[0]
    h0 = b.node("Transpose", ["state_in"], perm=[1, 0, 2])[0]  # (1, B, H)
    p = make_params("gru", feats, hidden, 1, False, seed + 1)[0]
    y, hn = b.node(
        "GRU",
        [x, b.const("W", p["W"]), b.const("R", p["R"]), b.const("B", p["B"]), "", h0],
        n_out=2,
        hidden_size=hidden,
        linear_before_reset=1,
    )
    y = b.node("Squeeze", [y, b.const("ax", np.array([1], np.int64))])[0]  # (T, B, H)
    w = rng.normal(0, 0.5, (hidden, classes)).astype(np.float32)
    s = b.node("MatMul", [y, b.const("Wout", w)])[0]
    b.nodes.append(helper.make_node("Transpose", [s], ["scores"], perm=[1, 0, 2]))
    b.nodes.append(helper.make_node("Transpose", [hn], ["state_out"], perm=[1, 0, 2]))
    f32 = TensorProto.FLOAT
    g_in = [
        helper.make_tensor_value_info("features", f32, ["N", "T", feats]),
        helper.make_tensor_value_info("state_in", f32, ["N", 1, hidden]),
        helper.make_tensor_value_info("sample_rate", TensorProto.INT64, []),
    ]
    g_out = [
        helper.make_tensor_value_info("scores", f32, ["N", "T", classes]),
        helper.make_tensor_value_info("state_out", f32, ["N", 1, hidden]),
    ]
    return _save(_model(b, "kws", g_in, g_out), path, contract if sidecar else None)
