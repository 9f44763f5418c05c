"""The model contract: the one interface between export and serving.

An exported model carries its contract as JSON in the ONNX metadata under
``CONTRACT_KEY``. A model exported elsewhere declares the same JSON in a sidecar
file next to it (``model.onnx`` -> ``model.rnnzoo.json``). The serving runtime reads
nothing else about a model: no zoo code, no torch.

Conventions every rnnzoo graph follows (a sidecar may declare others):
- data inputs/outputs are batch-major: ``(batch, time, ...)``; ``batch_axis`` and
  ``time_axis`` say where those axes are, per tensor.
- each state input is paired with the state output that carries it to the next call;
  states use the ONNX recurrent layout ``(layers*directions, batch, hidden)``, batch axis 1.
- the same graph serves whole sequences, chunks and single steps, so a model that
  ``streamable`` says can stream gives, chunk by chunk, what it gives on the whole sequence.

numpy only: this module is imported by the serving runtime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rnnzoo.errors import InvalidArgument

CONTRACT_KEY = "rnnzoo.contract"
CONTRACT_FORMAT = "rnnzoo.contract/1"
SIDECAR_SUFFIX = ".rnnzoo.json"

TASKS = ("forecast", "classify", "tag", "lm", "seq2seq", "generic")
ROLES = ("model", "encoder", "decoder")
DTYPES = ("float32", "float64", "float16", "int64", "int32", "bool")
INIT_KINDS = ("zeros", "value")

Dim = int | str  # a fixed size, or a symbolic axis name such as "batch" or "time"


class ContractError(InvalidArgument):
    """A contract that is missing, malformed or inconsistent. The message says how to fix it."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str
    shape: list[Dim]
    meaning: str = ""
    batch_axis: int | None = 0  # None: the tensor has no batch axis (a constant)
    time_axis: int | None = 1  # None: the tensor has no time axis

    def feature_shape(self) -> list[Dim]:
        """The dims that are neither batch nor time (what one step of one sequence holds)."""
        skip = {self.batch_axis, self.time_axis}
        return [d for i, d in enumerate(self.shape) if i not in skip]


@dataclass(frozen=True)
class StateSpec:
    """A recurrent state: fed as ``input``, returned as ``output`` for the next call."""

    input: str
    output: str
    dtype: str
    shape: list[Dim]  # e.g. [2, "batch", 128]
    batch_axis: int = 1
    init: str = "zeros"  # "zeros" or "value" (then ``init_value`` holds one sequence's state)
    init_value: list[Any] | None = None  # nested lists, shape = shape without the batch axis
    meaning: str = ""


@dataclass(frozen=True)
class ConstantInput:
    """An extra graph input fed the same value on every call (e.g. a sample-rate scalar)."""

    name: str
    dtype: str
    value: Any  # nested lists or a scalar
    meaning: str = ""


@dataclass(frozen=True)
class Contract:
    name: str
    task: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    states: list[StateSpec] = field(default_factory=list)
    constants: list[ConstantInput] = field(default_factory=list)
    streamable: bool = True
    role: str = "model"  # seq2seq: "encoder" or "decoder", grouped by ``group``
    group: str | None = None  # the model name that an encoder/decoder pair is served as
    vocab: list[str] | None = None  # token id -> string (lm, seq2seq source, tag input)
    target_vocab: list[str] | None = None  # seq2seq decoder output vocabulary
    target_separator: str = ""  # joins decoded target tokens: " " for word-level vocabularies
    labels: list[str] | None = None  # class/tag id -> name
    normalization: dict[str, float] | None = None  # e.g. {"mean": .., "std": ..}
    special_tokens: dict[str, int] = field(default_factory=dict)  # e.g. {"bos": 1, "eos": 2}
    description: str = ""
    source: dict[str, str] = field(default_factory=dict)  # checkpoint hash, exporter versions
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = CONTRACT_FORMAT

    # ---- (de)serialisation -------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "contract") -> Contract:
        if not isinstance(data, dict):
            raise ContractError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format", CONTRACT_FORMAT)
        if fmt != CONTRACT_FORMAT:
            raise ContractError(
                f"{origin}: unsupported contract format {fmt!r}; this rnnzoo reads "
                f"{CONTRACT_FORMAT!r} (re-export the model with this version)"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContractError(
                f"{origin}: unknown contract fields {unknown}; known: {sorted(known)}"
            )
        try:
            kw = dict(data)
            kw["inputs"] = [TensorSpec(**t) for t in data.get("inputs", [])]
            kw["outputs"] = [TensorSpec(**t) for t in data.get("outputs", [])]
            kw["states"] = [StateSpec(**s) for s in data.get("states", [])]
            kw["constants"] = [ConstantInput(**c) for c in data.get("constants", [])]
            contract = cls(**kw)
        except TypeError as exc:  # missing/unexpected keys in a nested spec
            raise ContractError(f"{origin}: {exc}") from None
        contract.validate(origin=origin)
        return contract

    @classmethod
    def from_json(cls, text: str, *, origin: str = "contract") -> Contract:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContractError(f"{origin}: not valid JSON ({exc})") from None
        return cls.from_dict(data, origin=origin)

    # ---- checks -------------------------------------------------------------
    def validate(self, *, origin: str = "contract") -> None:
        """Raise ContractError listing every problem found."""
        problems: list[str] = []
        if not self.name:
            problems.append("'name' is empty")
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} is not one of {list(TASKS)}")
        if self.role not in ROLES:
            problems.append(f"role {self.role!r} is not one of {list(ROLES)}")
        if self.role != "model" and not self.group:
            problems.append(f"role {self.role!r} needs 'group' (the served model name)")
        if not self.inputs:
            problems.append("no data inputs declared")
        if not self.outputs:
            problems.append("no outputs declared")
        names: set[str] = set()
        for spec in [*self.inputs, *self.outputs]:
            if spec.name in names:
                problems.append(f"tensor name {spec.name!r} declared twice")
            names.add(spec.name)
            if spec.dtype not in DTYPES:
                problems.append(f"{spec.name}: dtype {spec.dtype!r} is not one of {list(DTYPES)}")
            for axis_name, axis in (("batch_axis", spec.batch_axis), ("time_axis", spec.time_axis)):
                if axis is not None and not 0 <= axis < len(spec.shape):
                    problems.append(f"{spec.name}: {axis_name}={axis} outside shape {spec.shape}")
        for st in self.states:
            for n in (st.input, st.output):
                if n in names:
                    problems.append(f"state tensor {n!r} also declared as a data input/output")
                names.add(n)
            if st.dtype not in DTYPES:
                problems.append(
                    f"state {st.input}: dtype {st.dtype!r} is not one of {list(DTYPES)}"
                )
            if not 0 <= st.batch_axis < len(st.shape):
                problems.append(f"state {st.input}: batch_axis={st.batch_axis} outside {st.shape}")
            if st.init not in INIT_KINDS:
                problems.append(
                    f"state {st.input}: init {st.init!r} is not one of {list(INIT_KINDS)}"
                )
            if st.init == "value" and st.init_value is None:
                problems.append(f"state {st.input}: init='value' needs 'init_value'")
            fixed = [d for i, d in enumerate(st.shape) if i != st.batch_axis]
            if any(not isinstance(d, int) for d in fixed):
                problems.append(
                    f"state {st.input}: every dim but the batch axis must be a fixed int, got {st.shape}"
                )
        for c in self.constants:
            if c.name in names:
                problems.append(f"constant input {c.name!r} clashes with another tensor name")
            names.add(c.name)
        if problems:
            raise ContractError(f"{origin} is invalid:\n  - " + "\n  - ".join(problems))

    # ---- helpers ---------------------------------------------------------------
    def state_feature_shape(self, state: StateSpec) -> list[int]:
        return [int(d) for i, d in enumerate(state.shape) if i != state.batch_axis]


def sidecar_path(onnx_path: str | Path) -> Path:
    """``dir/model.onnx`` -> ``dir/model.rnnzoo.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name.removesuffix(".onnx") + SIDECAR_SUFFIX)


def read_contract(onnx_path: str | Path) -> Contract:
    """The contract of an ONNX file: its sidecar if present, else its metadata.

    Reads only the metadata (not the weights' meaning), with the ``onnx`` package.
    """
    path = Path(onnx_path)
    side = sidecar_path(path)
    if side.exists():
        return Contract.from_json(side.read_text(encoding="utf-8"), origin=str(side))
    if not path.exists():
        raise ContractError(f"{path}: no such file")
    import onnx  # lazy: the CLI imports this module at start-up

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ContractError(
            f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc}); "
            "re-export it or check that the file is complete"
        ) from None
    meta = {p.key: p.value for p in model.metadata_props}
    if CONTRACT_KEY not in meta:
        raise ContractError(
            f"{path}: no rnnzoo contract in its metadata and no sidecar {side.name}; "
            f"export it with `rnnzoo export` or write the sidecar (see docs/contract.md)"
        )
    return Contract.from_json(meta[CONTRACT_KEY], origin=f"{path} metadata")
