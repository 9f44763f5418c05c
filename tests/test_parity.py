"""The parity rule: per-step, short and conditioned long cases; every exporter mutant fails."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rnnzoo.export import native
from rnnzoo.export.onnx_export import export_model
from rnnzoo.export.parity import FIXED_T, KICK_EVERY, LOCAL_ULPS, Case, Report, U
from rnnzoo.export.verify import verify_net
from rnnzoo.models.rnn import RecurrentNet, RNNConfig

# Small enough to run in seconds, long enough for every kind of case: per-step at each T,
# whole T <= 8 at the fixed tolerance, whole and chunked T = 64 and 300 by their conditioning.
GRID = {"times": (1, 7, 64, 300), "batches": (1, 3), "stream": (300, 3)}


def net_of(cell: str, layers: int = 2, bidir: bool = False, seed: int = 0, **kw) -> RecurrentNet:
    torch.manual_seed(seed)
    cfg = RNNConfig(
        cell=cell,
        hidden_size=8,
        num_layers=layers,
        bidirectional=bidir,
        input_size=3,
        output_size=4,
        **kw,
    )
    return RecurrentNet(cfg).eval()


def exported(net: RecurrentNet, tmp_path, name: str = "m.onnx"):
    [path] = export_model(net, tmp_path / name, name="m")
    return path


def recurrent_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in native.GATE_ORDER]


# ---- a correct export passes, with every kind of case ---------------------------------------


@pytest.mark.parametrize(("cell", "bidir"), [("gru", False), ("lstm", False), ("rnn_tanh", True)])
def test_correct_export_passes_with_per_step_short_and_conditioned_long_cases(
    tmp_path, cell, bidir
):
    net = net_of(cell, bidir=bidir)
    report = verify_net(net, exported(net, tmp_path), **GRID)
    assert report.ok, report.summary()
    modes = {c.mode for c in report.cases}
    if bidir:  # judged on whole sequences only
        assert modes == {"whole"}
        assert "judged on whole sequences only" in report.notes[0]
    else:
        assert {"step1", "step8", "stream/chunk1", "stream/chunk7", "stream/random"} < modes
        starts = {c.time for c in report.cases if c.mode == "step8"}
        assert starts == {0, *GRID["times"]}  # from every T of the grid, and from the start
    for c in report.cases:
        assert (c.kappa is None) == (c.time <= FIXED_T or c.mode.startswith("step")), c
    long = [c for c in report.cases if c.kappa is not None]
    assert long and all(c.kappa >= 1 and c.tol > 1e-5 for c in long)
    assert {r["time"] for r in report.conditioning} == {64, 300}
    assert "conditioning m T=300: kappa" in report.summary()


def test_conditioning_separates_contractive_integrating_and_chaotic_nets(tmp_path):
    """kappa is measured in float64 from the net itself: a few chunks' worth of steps when it
    forgets, ~T when it integrates, astronomically large when it is chaotic (then the case
    says so)."""

    def kappa_of(net):
        r = verify_net(net, exported(net, tmp_path), times=(1, 1000), batches=(2,), stream=None)
        assert r.ok, r.summary()
        [row] = r.conditioning
        return row

    contractive = net_of("rnn_tanh", layers=1)
    with torch.no_grad():
        contractive.rnn.weight_hh_l0.mul_(0.1)
    integrating = net_of("rnn_relu", layers=1)
    with torch.no_grad():  # h_t = relu(h_{t-1} + small input): a perturbation never fades
        integrating.rnn.weight_hh_l0.copy_(torch.eye(8))
        integrating.rnn.bias_hh_l0.zero_()
        integrating.rnn.bias_ih_l0.fill_(0.01)
        integrating.rnn.weight_ih_l0.mul_(0.01)
    chaotic = net_of("rnn_tanh", layers=1)
    with torch.no_grad():
        chaotic.rnn.weight_hh_l0.copy_(torch.randn(8, 8) * 3.0)
    c, i, x = kappa_of(contractive), kappa_of(integrating), kappa_of(chaotic)
    assert c["kappa"] < 3 * KICK_EVERY and c["resolved"]
    assert 500 < i["kappa"] < 5000 and i["resolved"]
    assert x["kappa"] > 1e6 and not x["resolved"]
    assert x["tol"] == pytest.approx(1e-5 + LOCAL_ULPS * U * x["kappa"])


def test_a_small_error_fails_on_per_step_and_short_cases_even_when_long_ones_cannot_tell(
    tmp_path,
):
    net = net_of("rnn_tanh", layers=1)
    with torch.no_grad():
        net.rnn.weight_hh_l0.copy_(torch.randn(8, 8) * 3.0)  # chaotic: long cases are vacuous
    path = exported(net, tmp_path)
    model = onnx.load(str(path))
    for init in model.graph.initializer:  # nudge the head's bias by 1e-4
        arr = numpy_helper.to_array(init)
        if arr.shape == (4,):
            init.CopyFrom(numpy_helper.from_array(arr + 1e-4, init.name))
            break
    else:
        pytest.fail("no head bias initializer found")
    onnx.save(model, str(path))
    report = verify_net(net, path, **GRID)
    assert not report.ok
    failing = {(c.mode, c.time) for c in report.failures}
    assert ("step1", 0) in failing and ("step1", 300) in failing and ("whole", 7) in failing
    assert ("whole", 300) not in failing  # chaotic: that long case cannot tell
    assert all(c.tensor == "y" for c in report.failures)
    line = next(ln for ln in report.summary().splitlines() if "FAIL m step1 B=1 T=0 y" in ln)
    assert line.startswith("FAIL m step1 B=1 T=0 y: max abs 1.0") and "> tolerance 1.00e-05" in line


def test_a_tensor_judged_only_by_conditioned_cases_does_not_pass():
    long = Case("g", "whole", 3, 1000, "hn", 2e-5, 0.1, True, tol=2e-4, kappa=30.0)
    report = Report(cases=[long])
    assert not report.ok and report.unjudged == ["g/hn"]
    assert "FAIL g/hn: no fixed-tolerance case compared it" in report.summary()
    report.cases.append(Case("g", "step1", 3, 1000, "hn", 1e-7, 0.01, True, tol=1e-5))
    assert report.ok


# ---- mutants of the exporter: each must fail ------------------------------------------------


def _mutate_weights(monkeypatch, fn):
    """Exporter mutant: ``fn(W, R, B, rnn, layer) -> (W, R, B)`` applied to every layer."""
    original = native.onnx_weights

    def mutated(rnn, layer):
        return fn(*original(rnn, layer), rnn, layer)

    monkeypatch.setattr(native, "onnx_weights", mutated)


def _mutate_attrs(monkeypatch, **attrs):
    original = native.NativeLayers.__init__

    def init(self, rnn):
        original(self, rnn)
        self.attrs.update(attrs)

    monkeypatch.setattr(native.NativeLayers, "__init__", init)


def _swap_halves_of_bias(W, R, B, rnn, layer):
    half = B.shape[1] // 2
    return W, R, torch.cat([B[:, half:], B[:, :half]], dim=1)  # [Rb, Wb] instead of [Wb, Rb]


def _swap_directions(W, R, B, rnn, layer):
    return W.flip(0), R.flip(0), B.flip(0)  # forward weights run backward and vice versa


MUTANTS = {
    "lstm gates in PyTorch order": (
        "lstm",
        False,
        lambda mp: mp.setitem(native.GATE_ORDER, "LSTM", [0, 1, 2, 3]),
    ),
    "gru gates r and z swapped": (
        "gru",
        False,
        lambda mp: mp.setitem(native.GATE_ORDER, "GRU", [0, 1, 2]),
    ),
    "gru bias halves swapped": ("gru", False, lambda mp: _mutate_weights(mp, _swap_halves_of_bias)),
    "gru linear_before_reset=0": (
        "gru",
        False,
        lambda mp: _mutate_attrs(mp, linear_before_reset=0),
    ),
    "rnn run in reverse": ("rnn_tanh", False, lambda mp: _mutate_attrs(mp, direction="reverse")),
    "bidirectional gru directions swapped": (
        "gru",
        True,
        lambda mp: _mutate_weights(mp, _swap_directions),
    ),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_every_exporter_mutant_fails_parity(tmp_path, monkeypatch, mutant):
    cell, bidir, apply = MUTANTS[mutant]
    net = net_of(cell, bidir=bidir)
    with monkeypatch.context() as mp:
        apply(mp)
        path = exported(net, tmp_path, "mutant.onnx")
    report = verify_net(net, path, **GRID)
    assert not report.ok, f"{mutant} passed:\n{report.summary()}"
    # Caught at the fixed tolerance, not only by the conditioned long cases.
    assert any(c.fixed and not c.ok for c in report.failures)
    assert min(c.max_abs for c in report.failures if c.fixed) > 1e-3
    control = verify_net(net, exported(net, tmp_path), **GRID)  # the same net, unmutated
    assert control.ok, control.summary()


def test_states_fed_to_the_wrong_layer_fail_parity(tmp_path):
    net = net_of("gru", layers=2)
    path = exported(net, tmp_path)
    model = onnx.load(str(path))
    first, second = recurrent_nodes(model)
    h_first, h_second = first.input[5], second.input[5]  # initial_h of each layer
    first.input[5], second.input[5] = h_second, h_first
    onnx.save(model, str(path))
    report = verify_net(net, path, **GRID)
    assert not report.ok
    assert {c.tensor for c in report.failures} == {"y", "hn"}
    assert any(c.mode == "step1" and c.time == 0 for c in report.failures)


def test_a_time_axis_fixed_to_the_example_length_fails_with_the_runtime_error(tmp_path):
    net = net_of("lstm", layers=1)
    path = exported(net, tmp_path)
    model = onnx.load(str(path))
    for v in [model.graph.input[0], model.graph.output[0]]:
        v.type.tensor_type.shape.dim[1].dim_value = 3  # the export example's length
    onnx.save(model, str(path))
    report = verify_net(net, path, **GRID)  # no exception: every length but 3 fails
    assert not report.ok
    assert all(c.error and "ONNX Runtime failed" in c.error for c in report.failures)
    failing = {(c.mode, c.time) for c in report.failures}
    assert ("whole", 64) in failing and ("step1", 0) in failing and ("stream/chunk7", 64) in failing
    assert "InvalidArgument" in report.summary() or "Got invalid dimensions" in report.summary()


def test_parity_results_are_the_same_for_the_same_seed(tmp_path):
    net = net_of("gru")
    path = exported(net, tmp_path)
    a, b = (verify_net(net, path, **GRID) for _ in range(2))
    assert [(c.mode, c.time, c.tensor, c.max_abs) for c in a.cases] == [
        (c.mode, c.time, c.tensor, c.max_abs) for c in b.cases
    ]
    assert np.isfinite(a.max_kappa())
