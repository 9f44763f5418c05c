"""The model contract: round trips, validation that lists every problem, sidecars, no torch."""

import json
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from rnnzoo.contract import (
    CONTRACT_KEY,
    Contract,
    ContractError,
    StateSpec,
    TensorSpec,
    read_contract,
    sidecar_path,
)


def lstm_contract(**kw) -> Contract:
    base = dict(
        name="demo",
        task="forecast",
        inputs=[TensorSpec("x", "float32", ["batch", "time", 1])],
        outputs=[TensorSpec("y", "float32", ["batch", "time", 1])],
        states=[
            StateSpec("h0", "hn", "float32", [2, "batch", 8]),
            StateSpec("c0", "cn", "float32", [2, "batch", 8]),
        ],
        normalization={"mean": 0.5, "std": 2.0},
    )
    base.update(kw)
    return Contract(**base)


def test_json_round_trip_is_exact():
    c = lstm_contract()
    again = Contract.from_json(c.to_json())
    assert again == c
    assert again.states[1].output == "cn"
    assert again.inputs[0].feature_shape() == [1]
    assert again.state_feature_shape(again.states[0]) == [2, 8]


def test_validation_lists_every_problem():
    bad = json.loads(lstm_contract().to_json())
    bad["task"] = "poetry"
    bad["inputs"][0]["dtype"] = "float8"
    bad["states"][0]["shape"] = [2, "batch", "hidden"]
    with pytest.raises(ContractError) as err:
        Contract.from_dict(bad, origin="m.rnnzoo.json")
    msg = str(err.value)
    assert "m.rnnzoo.json" in msg
    assert "task: 'poetry' is not one of" in msg
    assert "float8" in msg
    assert "fixed int" in msg


def test_context_and_dropped_steps_on_a_tensor_without_a_time_axis_are_refused_at_load():
    bad = json.loads(lstm_contract().to_json())
    bad["format"] = "rnnzoo.contract/2"
    bad["inputs"][0].update(shape=["batch", 1], time_axis=None, context_steps=4)
    bad["outputs"][0].update(shape=["batch", 1], time_axis=None, drop_leading_steps=4)
    with pytest.raises(ContractError) as err:
        Contract.from_dict(bad, origin="m.rnnzoo.json")
    msg = str(err.value)
    assert "context_steps needs a batch_axis and a time_axis" in msg
    assert "drop_leading_steps needs a time_axis" in msg


def test_unknown_fields_and_formats_are_named():
    data = json.loads(lstm_contract().to_json())
    data["stateful"] = True
    with pytest.raises(ContractError, match="unknown contract fields \\['stateful'\\]"):
        Contract.from_dict(data)
    data.pop("stateful")
    data["format"] = "rnnzoo.contract/99"
    with pytest.raises(ContractError, match="unsupported contract format"):
        Contract.from_dict(data)
    with pytest.raises(ContractError, match="not valid JSON"):
        Contract.from_json("{nope")


def _tiny_onnx(path, contract: Contract | None) -> None:
    node = helper.make_node("Identity", ["x"], ["y"])
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "time", 1])  # noqa: E731
    model = helper.make_model(helper.make_graph([node], "g", [vi("x")], [vi("y")]))
    if contract is not None:
        helper.set_model_props(model, {CONTRACT_KEY: contract.to_json()})
    onnx.save(model, str(path))


def test_reads_metadata_then_sidecar_overrides(tmp_path):
    path = tmp_path / "m.onnx"
    _tiny_onnx(path, lstm_contract(name="from-metadata"))
    assert read_contract(path).name == "from-metadata"
    sidecar_path(path).write_text(lstm_contract(name="from-sidecar").to_json())
    assert sidecar_path(path).name == "m.rnnzoo.json"
    assert read_contract(path).name == "from-sidecar"


def test_clear_errors_for_missing_contract_and_broken_files(tmp_path):
    plain = tmp_path / "plain.onnx"
    _tiny_onnx(plain, None)
    with pytest.raises(ContractError, match=r"no rnnzoo contract.*plain\.rnnzoo\.json"):
        read_contract(plain)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 this is not protobuf \xff\xff\xff")
    with pytest.raises(ContractError, match=r"junk\.onnx: not a readable ONNX file"):
        read_contract(junk)
    with pytest.raises(ContractError, match="no such file"):
        read_contract(tmp_path / "absent.onnx")


def test_contract_module_imports_without_torch():
    code = "import sys, rnnzoo.contract, rnnzoo.errors; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
