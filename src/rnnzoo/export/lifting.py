"""State lifting: every recurrent call's state becomes graph I/O, whatever the forward's signature.

``FlatModule(module, plan)`` holds a copy of the user's module, untouched, and calls it with
the flat signature ``(*data_inputs, *state_inputs) -> (*data_outputs, *state_outputs)`` in
contract order. Its recurrent calls (``nn.RNN``/``nn.GRU``/``nn.LSTM``, rnnzoo's hand-written
``ScratchRNN``, a cell called once) are captured for the duration of each forward
(``rnnzoo.export.capture``), so the module keeps its classes, attributes, ``state_dict`` keys
and its own forward code. Each recurrent *call* (a layer called twice has two) either

- ``lifted``: reads its initial state from a state input (the forward passed none, or passed
  zeros it made itself) and exposes its final state as a state output;
- ``given``: the forward takes that state as an argument (its final state is the state
  output, whether the forward returns it or not);
- ``internal``: the forward computes the initial state from data (an encoder's state fed to a
  decoder), or the call's batch is not the sequences' (time folded into batch); the call is
  left as it is and the streamability check decides.

Eagerly the captured calls run the layers' own forward (so ``copy.deepcopy(flat).double()``
gives the float64 reference); under export they emit native ONNX nodes
(``rnnzoo.export.native.NativeLayers``, ``sequence_lens`` for packed inputs:
``rnnzoo.export.packing``) or, for hand-written cells, placeholders that become ``Scan``
loops over the cell's own step (``rnnzoo.export.scan``). The per-call states travel through a
plain ``_Calls`` object, set at the start of each forward.
"""

from __future__ import annotations

import contextlib
import copy
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from rnnzoo.errors import InvalidArgument
from rnnzoo.export.capture import Recorder, capturing, is_cell, is_layer
from rnnzoo.export.guard import in_layer
from rnnzoo.export.native import NativeLayers, onnx_op
from rnnzoo.export.packing import fake_packing, repack, unpack
from rnnzoo.export.probe import Struct, captured_names, flatten, is_recurrent, unflatten
from rnnzoo.export.scan import ScratchLayers, check_scratch
from rnnzoo.models.cells import ScratchRNN

MODES = ("lifted", "given", "internal")
MARK = "_rnnzoo_capture_name"  # set on the flat module's own copy of each layer and cell
# Set while rnnzoo runs torch.export itself (before torch.onnx.export translates the program):
# the layers then emit their native nodes as under torch.onnx.export.
TRACING: ContextVar[bool] = ContextVar("rnnzoo_export_tracing", default=False)


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


def exporting() -> bool:
    """Whether the forward is being traced for export (native nodes, fake packing)."""
    return torch.onnx.is_in_onnx_export() or TRACING.get()


class _Lifting(Recorder):
    """Routes the flat module's recurrent calls: lifted states in and out, native nodes (or
    Scan placeholders) under ``torch.onnx.export``, the layer's own forward otherwise."""

    def __init__(self, flat: FlatModule) -> None:
        self.flat = flat

    def owns(self, module: nn.Module) -> bool:
        return MARK in module.__dict__

    def call(self, mod: nn.Module, run: Any, x: Any, hx: Any) -> Any:
        name = mod.__dict__[MARK]
        calls = self.flat.calls
        k = calls.next
        if k >= len(calls.specs) or calls.specs[k].layer != name:
            want = calls.specs[k].layer if k < len(calls.specs) else "no further call"
            raise InvalidArgument(
                f"recurrent call {k} went to layer {name!r} but the probe run saw {want!r}: "
                "the module calls its recurrent layers differently from run to run (data-"
                "dependent control flow); make the calls the same for every input"
            )
        calls.next += 1
        mode = calls.specs[k].mode
        lstm = isinstance(mod, (nn.LSTM, nn.LSTMCell)) or getattr(mod, "mode", None) == "lstm"
        if mode == "lifted":
            init = calls.initial[k]  # set for every lifted call (reset)
            hx = init if lstm else cast("tuple[torch.Tensor, ...]", init)[0]
        cell = is_cell(mod)
        with in_layer(name):
            if cell:
                out = run(x, hx)  # one step: plain tensor ops, traced as they are
                hn = out
            elif exporting():
                native = self.flat.natives[self.flat.native_index[name]]
                if isinstance(x, nn.utils.rnn.PackedSequence):  # fake-packed: see packing.py
                    if not isinstance(native, NativeLayers):
                        raise InvalidArgument(
                            f"layer {name!r}: a hand-written cell cannot take a packed sequence"
                        )
                    seq, lengths, hx = unpack(x, hx, lstm)
                    out, hn = native(seq, hx, lengths)
                    result = repack(x, out, hn, lstm)
                    out, hn = result
                else:
                    result = native(x, hx)
                    out, hn = result
            else:
                result = run(x, hx)
                out, hn = result
        # every call's final state (a "given" state the forward drops, as the word language
        # model's ``out, _ = self.rnn(emb, hidden)`` does, is still the state output)
        calls.final[k] = tuple(hn) if lstm else (hn,)
        return out if cell else result


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
    """``(*data_inputs, *state_inputs) -> (*data_outputs, *state_outputs)`` around the module.

    The user's module (a copy) is left as it is: its recurrent calls are captured for the
    duration of each forward (``rnnzoo.export.capture``), so its classes, attributes,
    ``state_dict`` keys and its own forward code are the ones it was written with.
    """

    def __init__(self, module: nn.Module, plan: Plan) -> None:
        super().__init__()
        self.plan = plan
        self.calls = _Calls(plan.calls)
        self.module = copy.deepcopy(wrap_bare(module)).eval()
        self._mark()
        # Export-time stand-ins, one per called layer (cells trace as they are): native
        # nodes from reordered weights, or Scan placeholders for hand-written cells, which
        # ``scratch_cores`` lists in their placeholders' order.
        self.natives = nn.ModuleList()
        self.native_index: dict[str, int] = {}
        self.scratch_cores: list[ScratchRNN] = []
        for spec in plan.calls:
            if spec.layer in self.native_index:
                continue
            try:
                rnn = self.module.get_submodule(spec.layer)
            except AttributeError:
                rnn = None
            if rnn is not None and is_cell(rnn):
                continue
            if rnn is None or not is_layer(rnn):
                raise InvalidArgument(
                    f"the recorded plan calls layer {spec.layer!r}, which the module given has "
                    "not as a recurrent layer: verify the graph with the module it was "
                    "exported from"
                )
            op = check_layer(spec.layer, rnn)
            self.native_index[spec.layer] = len(self.natives)
            if op == "Scan":
                scratch = cast(ScratchRNN, rnn)  # check_layer: Scan is a ScratchRNN's op
                self.natives.append(ScratchLayers(scratch, len(self.scratch_cores)))
                self.scratch_cores.append(scratch)
            else:
                self.natives.append(NativeLayers(cast(nn.RNNBase, rnn)))
        self.n_data = len(plan.data_in)

    def _mark(self) -> None:
        """Each recurrent layer and cell carries its name: torch.export may run the forward
        on other instances of a submodule than the ones named here (seen with asteroid's
        LSTMMasker), and a plain attribute travels with every copy. Marked again at every
        forward: a module that copies itself through its state_dict (flair's LanguageModel
        ``__getstate__``) comes back from ``copy.deepcopy`` with new, unmarked layers."""
        for layer_name, m in captured_names(self.module).items():
            m.__dict__[MARK] = layer_name

    @property
    def native(self) -> bool:
        """Whether the graph has native RNN/GRU/LSTM nodes."""
        return any(isinstance(n, NativeLayers) for n in self.natives)

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
        if not exporting():
            self._mark()
        packing = fake_packing() if exporting() else contextlib.nullcontext()
        with capturing(_Lifting(self)), packing:
            result = self.module(*args)
        if self.calls.next != len(plan.calls):
            raise InvalidArgument(
                f"the forward made {self.calls.next} recurrent calls, the probe run "
                f"{len(plan.calls)}: the calls must not depend on the input's values"
            )
        outs, _ = flatten(result)
        final = [
            outs[ref.out_leaf]
            if ref.out_leaf is not None
            else cast("tuple[torch.Tensor, ...]", self.calls.final[ref.call])[ref.part]
            for ref in plan.states
        ]
        return (*[outs[i] for i in plan.data_out], *final)
