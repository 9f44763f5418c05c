"""State lifting: every recurrent call's state becomes graph I/O, whatever the forward's signature.

``FlatModule(module, plan)`` is a copy of the user's module in which each recurrent layer
(``nn.RNN``/``nn.GRU``/``nn.LSTM``, or rnnzoo's hand-written ``ScratchRNN``) is replaced by a
``LiftedRNN`` stand-in, called with
the flat signature ``(*data_inputs, *state_inputs) -> (*data_outputs, *state_outputs)`` in
contract order. Each recurrent *call* (a layer called twice has two) either

- ``lifted``: reads its initial state from a state input (the forward passed none, or passed
  zeros it made itself) and exposes its final state as a state output;
- ``given``: the forward takes that state as an argument and returns the final state: those
  arguments are the state I/O;
- ``internal``: the forward computes the initial state from data (an encoder's state fed to a
  decoder); the call is left as it is and the streamability check decides.

Eagerly the stand-ins run the original layers, which stay ordinary submodules (so
``copy.deepcopy(flat).double()`` gives the float64 reference); under
``torch.onnx.export`` they emit native ONNX nodes (``rnnzoo.export.native.NativeLayers``) or,
for hand-written cells, placeholders that become ``Scan`` loops over the cell's own step
(``rnnzoo.export.scan``).
The per-call states travel through a plain ``_Calls`` object shared by the wrapper and the
stand-ins, set at the start of each forward.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rnnzoo.errors import InvalidArgument
from rnnzoo.export.native import NativeLayers, onnx_op
from rnnzoo.export.probe import Struct, flatten, is_recurrent, unflatten
from rnnzoo.export.scan import ScratchLayers, check_scratch
from rnnzoo.models.cells import ScratchRNN

MODES = ("lifted", "given", "internal")


@dataclass
class CallSpec:
    layer: str
    mode: str


@dataclass
class StateRef:
    """One state pair: call ``call``'s part ``part`` (0: h, 1: c). ``in_leaf``/``out_leaf`` set
    where the forward's own argument / returned tensor carries it (else a lifted graph I/O)."""

    call: int
    part: int
    in_leaf: int | None = None
    out_leaf: int | None = None


@dataclass
class Plan:
    """How the flat signature maps onto the forward's own arguments and results (JSON-able)."""

    args: Struct  # structure of the forward's positional arguments
    data_in: list[int]  # argument leaf per data input, in contract order
    data_out: list[int]  # result leaf per data output, in contract order
    calls: list[CallSpec] = field(default_factory=list)
    states: list[StateRef] = field(default_factory=list)  # contract order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(
            args=d["args"],
            data_in=list(d["data_in"]),
            data_out=list(d["data_out"]),
            calls=[CallSpec(**c) for c in d["calls"]],
            states=[StateRef(**s) for s in d["states"]],
        )


class _Calls:
    """Per-forward bookkeeping shared by the wrapper and its stand-ins (not a module)."""

    def __init__(self, specs: list[CallSpec]) -> None:
        self.specs = specs
        self.reset([])

    def reset(self, initial: list[tuple[torch.Tensor, ...] | None]) -> None:
        self.initial = initial
        self.final: list[tuple[torch.Tensor, ...] | None] = [None] * len(self.specs)
        self.next = 0


def check_layer(name: str, rnn: nn.Module) -> str:
    """The ONNX op for layer ``name`` (``Scan`` for a hand-written cell), or an error naming it
    and the fix."""
    if isinstance(rnn, ScratchRNN):
        try:
            check_scratch(rnn)
        except InvalidArgument as exc:
            raise InvalidArgument(f"layer {name!r}: {exc}") from None
        return "Scan"
    if isinstance(rnn, nn.LSTM) and rnn.proj_size:
        raise InvalidArgument(
            f"layer {name!r}: nn.LSTM(proj_size={rnn.proj_size}) cannot export: the ONNX LSTM "
            "node has no output projection. Fix: retrain with proj_size=0 and a Linear layer "
            "on the outputs, or export the projected cell as a step module with export_step"
        )
    try:
        return onnx_op(rnn)
    except InvalidArgument as exc:
        raise InvalidArgument(f"layer {name!r}: {exc}") from None


class LiftedRNN(nn.Module):
    """Stand-in for one recurrent layer: same call signature and results.

    ``core``: the index of a hand-written cell among the module's (its Scan placeholders say
    which cell they stand for).
    """

    def __init__(self, name: str, rnn: nn.Module, calls: _Calls, core: int = 0) -> None:
        super().__init__()
        self.op = check_layer(name, rnn)
        self.name = name
        self.rnn = rnn  # eager runs (float32 and the float64 reference)
        # export: native nodes from reordered weights, or Scan placeholders
        self.native = ScratchLayers(rnn, core) if self.op == "Scan" else NativeLayers(rnn)
        self.calls = calls
        self.lstm = isinstance(rnn, nn.LSTM) or getattr(rnn, "mode", None) == "lstm"

    def forward(self, x: torch.Tensor, hx: Any = None):
        calls = self.calls
        k = calls.next
        if k >= len(calls.specs) or calls.specs[k].layer != self.name:
            want = calls.specs[k].layer if k < len(calls.specs) else "no further call"
            raise InvalidArgument(
                f"recurrent call {k} went to layer {self.name!r} but the probe run saw {want!r}: "
                "the module calls its recurrent layers differently from run to run (data-"
                "dependent control flow); make the calls the same for every input"
            )
        calls.next += 1
        mode = calls.specs[k].mode
        if mode == "lifted":
            init = calls.initial[k]
            hx = init if self.lstm else init[0]
        if torch.onnx.is_in_onnx_export():
            out, hn = self.native(x, hx)
        else:
            out, hn = self.rnn(x, hx)
        if mode == "lifted":
            calls.final[k] = tuple(hn) if self.lstm else (hn,)
        return out, hn


def install(module: nn.Module, calls: _Calls) -> list[ScratchRNN]:
    """Replace every recurrent submodule of ``module`` (in place) by a ``LiftedRNN``; returns
    the hand-written cells, in the order their placeholders number them."""
    cores: list[ScratchRNN] = []
    for name, rnn in list(module.named_modules()):
        if not is_recurrent(rnn):
            continue
        if name == "":
            raise InvalidArgument(
                "the module is itself a recurrent layer: wrap it (export_module builds the wrapper)"
            )
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, LiftedRNN(name, rnn, calls, core=len(cores)))
        if isinstance(rnn, ScratchRNN):
            cores.append(rnn)
    return cores


class _Bare(nn.Module):
    """Holds a bare recurrent layer passed as the module to export."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, hx: Any = None):
        return self.rnn(x, hx)


def wrap_bare(module: nn.Module) -> nn.Module:
    """A bare recurrent layer gets a one-line wrapper so that it can be replaced like any other."""
    return _Bare(module) if is_recurrent(module) else module


class FlatModule(nn.Module):
    """``(*data_inputs, *state_inputs) -> (*data_outputs, *state_outputs)`` around the module."""

    def __init__(self, module: nn.Module, plan: Plan) -> None:
        super().__init__()
        self.plan = plan
        self.calls = _Calls(plan.calls)
        self.module = copy.deepcopy(wrap_bare(module)).eval()
        # the hand-written cells, for expanding their Scan placeholders after the trace (a
        # plain list: they are submodules of ``module`` already)
        self.scratch_cores = install(self.module, self.calls)
        self.n_data = len(plan.data_in)

    def forward(self, *flat: torch.Tensor):
        plan = self.plan
        data, states = flat[: self.n_data], flat[self.n_data :]
        leaves: dict[int, torch.Tensor] = dict(zip(plan.data_in, data, strict=True))
        initial: list[list[torch.Tensor]] = [[] for _ in plan.calls]
        for ref, s in zip(plan.states, states, strict=True):
            if ref.in_leaf is not None:
                leaves[ref.in_leaf] = s
            else:
                initial[ref.call].append(s)
        args = unflatten([leaves[i] for i in range(len(leaves))], plan.args)
        self.calls.reset([tuple(parts) if parts else None for parts in initial])
        result = self.module(*args)
        if self.calls.next != len(plan.calls):
            raise InvalidArgument(
                f"the forward made {self.calls.next} recurrent calls, the probe run "
                f"{len(plan.calls)}: the calls must not depend on the input's values"
            )
        outs, _ = flatten(result)
        final = [
            outs[ref.out_leaf] if ref.out_leaf is not None else self.calls.final[ref.call][ref.part]
            for ref in plan.states
        ]
        return (*[outs[i] for i in plan.data_out], *final)
