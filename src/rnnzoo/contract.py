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

Formats: ``rnnzoo.contract/1`` is the original field set; ``rnnzoo.contract/2`` adds context
windows (``context_steps``/``initial_context`` on inputs, ``drop_leading_steps`` on outputs) and
chunk rules (``chunk``). A contract is written as /2 only when it uses a /2 field, so a server
that reads only /1 refuses it by its format instead of ignoring what it does not know; this
reader refuses a /1 file that uses a /2 field, and unknown fields and formats always. The JSON
Schema ``contract.schema.json`` (package data, ``schema()``) says every rule it can; the rest
(names unique, axes inside shapes, ...) is ``Contract.validate``.

numpy only: this module is imported by the serving runtime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from rnnzoo.errors import InvalidArgument

CONTRACT_KEY = "rnnzoo.contract"
CONTRACT_FORMAT = "rnnzoo.contract/1"  # the default: what a contract without /2 fields is
CONTRACT_FORMAT_2 = "rnnzoo.contract/2"
FORMATS = (CONTRACT_FORMAT, CONTRACT_FORMAT_2)
SCHEMA_FILE = "contract.schema.json"
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
    # /2, inputs: the server keeps the last ``context_steps`` steps of this input per session
    # and prepends them to each chunk (zeros, or ``initial_context``, before the first).
    context_steps: int = 0
    initial_context: list[Any] | None = None  # one sequence's K steps (no batch axis)
    # /2, outputs: steps dropped from the start of the time axis before returning (K for an
    # output given per input step, context included).
    drop_leading_steps: int = 0

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
class ChunkRule:
    """/2: the chunk lengths a model takes, in new steps: exactly ``steps``, or a multiple
    of ``multiple_of``."""

    steps: int | None = None
    multiple_of: int | None = None

    @property
    def unit(self) -> int:
        """Whole sequences are cut into pieces of a multiple of this."""
        return int(self.steps or self.multiple_of or 1)

    def describe(self) -> str:
        if self.steps:
            return f"chunks of exactly {self.steps} new steps (contract chunk.steps={self.steps})"
        return (
            f"chunks of a multiple of {self.multiple_of} new steps "
            f"(contract chunk.multiple_of={self.multiple_of})"
        )


# /2 fields at their defaults: omitted when written, so such a contract stays /1
_V2_DEFAULTS = {"context_steps": 0, "initial_context": None, "drop_leading_steps": 0}


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
    chunk: ChunkRule | None = None  # /2: the chunk lengths the model takes
    format: str = CONTRACT_FORMAT

    # ---- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form: /2 fields at their defaults left out, ``format`` /2 exactly when a
        /2 field is used (so a /1-only reader refuses it rather than ignoring the field)."""
        data = asdict(self)
        for spec in (*data["inputs"], *data["outputs"]):
            for key, default in _V2_DEFAULTS.items():
                if spec.get(key, default) == default:
                    spec.pop(key, None)
        if data["chunk"] is None:
            del data["chunk"]
        else:
            data["chunk"] = {k: v for k, v in data["chunk"].items() if v is not None}
        data["format"] = CONTRACT_FORMAT_2 if v2_fields(data) else CONTRACT_FORMAT
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "contract") -> Contract:
        if not isinstance(data, dict):
            raise ContractError(f"{origin}: expected a JSON object, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "$schema"}
        fmt = data.get("format", CONTRACT_FORMAT)
        if fmt not in FORMATS:
            raise ContractError(
                f"{origin}: unsupported contract format {fmt!r}; this rnnzoo reads "
                f"{list(FORMATS)} (upgrade rnnzoo, or re-export the model with this version)"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContractError(
                f"{origin}: unknown contract fields {unknown}; known: {sorted(known)}"
            )
        used = v2_fields(data)
        if used and fmt != CONTRACT_FORMAT_2:
            raise ContractError(
                f"{origin}: uses {used}, field(s) of {CONTRACT_FORMAT_2!r}, but declares format "
                f'{fmt!r}; set "format": "{CONTRACT_FORMAT_2}" (a server that reads only '
                "/1 then refuses the file instead of ignoring those fields)"
            )
        problems = schema_problems(data)
        try:
            kw = dict(data)
            kw["inputs"] = [TensorSpec(**t) for t in data.get("inputs", [])]
            kw["outputs"] = [TensorSpec(**t) for t in data.get("outputs", [])]
            kw["states"] = [StateSpec(**s) for s in data.get("states", [])]
            kw["constants"] = [ConstantInput(**c) for c in data.get("constants", [])]
            if data.get("chunk") is not None:
                kw["chunk"] = ChunkRule(**data["chunk"])
            contract = cls(**kw)
        except (TypeError, AttributeError) as exc:  # a nested spec of the wrong JSON type
            if problems:
                _raise(origin, problems)
            raise ContractError(f"{origin}: {exc}") from None
        try:
            more = contract._problems()
        except Exception:  # values of the wrong type: the schema has said so already
            more = []
        if problems or more:
            _raise(origin, [*problems, *(p for p in more if p not in problems)])
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
        """Raise ContractError listing every problem found: the JSON Schema's, then the
        checks a schema cannot say."""
        data = json.loads(json.dumps(asdict(self), default=list))
        problems = schema_problems(data)
        problems += [p for p in self._problems() if p not in problems]
        if problems:
            _raise(origin, problems)

    def _problems(self) -> list[str]:
        """What the JSON Schema cannot say: names unique, axes inside shapes, fixed dims."""
        problems: list[str] = []
        names: set[str] = set()
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            for i, spec in enumerate(specs):
                where = f"{kind}[{i}] ({spec.name})"
                if spec.name in names:
                    problems.append(f"tensor name {spec.name!r} declared twice")
                names.add(spec.name)
                axes = (("batch_axis", spec.batch_axis), ("time_axis", spec.time_axis))
                for axis_name, axis in axes:
                    if axis is not None and not 0 <= axis < len(spec.shape):
                        problems.append(f"{where}: {axis_name}={axis} outside shape {spec.shape}")
                if spec.batch_axis is not None and spec.batch_axis == spec.time_axis:
                    problems.append(f"{where}: batch_axis and time_axis are the same axis")
                if spec.context_steps and (spec.batch_axis is None or spec.time_axis is None):
                    problems.append(
                        f"{where}: context_steps needs a batch_axis and a time_axis (the server "
                        "keeps the last steps of each sequence); set both, or drop context_steps"
                    )
                if spec.drop_leading_steps and spec.time_axis is None:
                    problems.append(
                        f"{where}: drop_leading_steps needs a time_axis to drop steps from; set "
                        "it, or drop drop_leading_steps"
                    )
                if spec.context_steps:
                    skip = {spec.batch_axis, spec.time_axis}
                    free = [d for a, d in enumerate(spec.shape) if a not in skip]
                    if any(not isinstance(d, int) for d in free):
                        problems.append(
                            f"{where}: context_steps needs every dim but batch and time fixed "
                            f"(the server keeps the context), got {spec.shape}"
                        )
        for st in self.states:
            for n in (st.input, st.output):
                if n in names:
                    problems.append(f"state tensor {n!r} also declared as a data input/output")
                names.add(n)
            if not 0 <= st.batch_axis < len(st.shape):
                problems.append(f"state {st.input}: batch_axis={st.batch_axis} outside {st.shape}")
            fixed = [d for i, d in enumerate(st.shape) if i != st.batch_axis]
            if any(not isinstance(d, int) for d in fixed):
                problems.append(
                    f"state {st.input}: every dim but the batch axis must be a fixed int, got {st.shape}"
                )
        for c in self.constants:
            if c.name in names:
                problems.append(f"constant input {c.name!r} clashes with another tensor name")
            names.add(c.name)
        return problems

    # ---- helpers ---------------------------------------------------------------
    def state_feature_shape(self, state: StateSpec) -> list[int]:
        return [int(d) for i, d in enumerate(state.shape) if i != state.batch_axis]


def v2_fields(data: dict[str, Any]) -> list[str]:
    """The /2 fields a contract's JSON form uses (at other than their defaults)."""
    used = ["chunk"] if data.get("chunk") is not None else []
    for kind in ("inputs", "outputs"):
        specs = data.get(kind)
        for i, spec in enumerate(specs if isinstance(specs, list) else []):
            if not isinstance(spec, dict):
                continue
            for key, default in _V2_DEFAULTS.items():
                if spec.get(key, default) != default:
                    used.append(f"{kind}[{i}].{key}")
    return used


@cache
def schema() -> dict[str, Any]:
    """The contract's JSON Schema (``contract.schema.json``, shipped in the package)."""
    text = resources.files("rnnzoo").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _validator():
    import jsonschema  # lazy: the CLI imports this module at start-up

    cls = jsonschema.validators.validator_for(schema())
    cls.check_schema(schema())
    return cls(schema())


def schema_problems(data: Any) -> list[str]:
    """Every place ``data`` breaks the JSON Schema, as ``path: message`` lines."""
    out = []
    for err in sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.path]):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.path)
        where = where.lstrip(".") or "the contract"
        msg = err.message
        if err.instance is None and err.path and err.path[-1] == "value":
            msg = "not set (null, the placeholder `rnnzoo contract init` writes): set the value"
        elif err.validator == "oneOf" and err.schema.get("description"):
            msg = f"{msg} ({err.schema['description']})"
        elif err.validator == "unevaluatedProperties":
            msg = f"{msg} (unknown field)"
        out.append(f"{where}: {msg}")
    return out


def _raise(origin: str, problems: list[str]) -> None:
    raise ContractError(f"{origin} is invalid:\n  - " + "\n  - ".join(problems))


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
