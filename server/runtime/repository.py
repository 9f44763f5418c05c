"""The model repository: every ``.onnx`` with a contract in a directory, checked and grouped.

A file that fails to load (no contract, bad contract, contract/graph mismatch, ORT cannot load
it) fails the whole load with its name and the fix: a repository is never half-served.
seq2seq halves (role ``encoder``/``decoder``) are grouped by ``group`` into one served model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rnnzoo.contract import Contract, read_contract
from rnnzoo.errors import InvalidArgument, NotFound

from .model import ServedModel


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    streamable: bool
    contracts: dict[str, Contract]  # "model", or "encoder" + "decoder" for seq2seq
    description: str = ""

    @property
    def contract(self) -> Contract:
        """The single graph's contract (the decoder's for seq2seq)."""
        return self.contracts.get("model") or self.contracts["decoder"]


@dataclass
class ServedEntry:
    info: ModelInfo
    graphs: dict[str, ServedModel] = field(default_factory=dict)  # role -> graph

    @property
    def is_seq2seq(self) -> bool:
        return "encoder" in self.graphs


class ModelRepository:
    def __init__(self, entries: dict[str, ServedEntry]) -> None:
        self.entries = entries

    @classmethod
    def from_dir(cls, model_dir: str | Path, intra: int = 1, inter: int = 1) -> ModelRepository:
        d = Path(model_dir)
        if not d.is_dir():
            raise NotFound(f"model directory {d} does not exist; pass a directory of .onnx files")
        # Recursive, so a zoo build directory (one folder per entry) serves as it is.
        files = sorted(d.rglob("*.onnx"))
        if not files:
            raise NotFound(
                f"model directory {d} holds no .onnx files; export some with `rnnzoo export`"
            )
        singles: dict[str, ServedEntry] = {}
        halves: dict[str, dict[str, ServedModel]] = {}
        for f in files:
            contract = read_contract(f)
            graph = ServedModel(f, contract, intra, inter)
            if contract.role == "model":
                if contract.name in singles:
                    raise InvalidArgument(
                        f"{f}: model name {contract.name!r} is also used by "
                        f"{singles[contract.name].graphs['model'].path}; rename one in its contract"
                    )
                info = ModelInfo(
                    contract.name,
                    contract.task,
                    contract.streamable,
                    {"model": contract},
                    contract.description,
                )
                singles[contract.name] = ServedEntry(info, {"model": graph})
            else:
                pair = halves.setdefault(contract.group, {})
                if contract.role in pair:
                    raise InvalidArgument(
                        f"{f}: group {contract.group!r} already has a {contract.role} "
                        f"({pair[contract.role].path}); each group needs exactly one of each"
                    )
                pair[contract.role] = graph
        for group, pair in halves.items():
            missing = {"encoder", "decoder"} - set(pair)
            if missing:
                have = next(iter(pair.values())).path
                raise InvalidArgument(
                    f"{have}: seq2seq group {group!r} has no {sorted(missing)[0]} graph; put "
                    f"{group}.{sorted(missing)[0]}.onnx next to it"
                )
            if group in singles:
                raise InvalidArgument(f"{pair['encoder'].path}: name {group!r} is used twice")
            enc, dec = pair["encoder"].contract, pair["decoder"].contract
            if len(enc.states) != len(dec.states):
                raise InvalidArgument(
                    f"{pair['encoder'].path}: encoder has {len(enc.states)} states, decoder "
                    f"{len(dec.states)}; encoder state outputs map by position onto decoder inputs"
                )
            for key in ("bos", "eos"):
                if key not in dec.special_tokens:
                    raise InvalidArgument(
                        f"{pair['decoder'].path}: special_tokens lacks {key!r}; add it to the contract"
                    )
            info = ModelInfo(
                group,
                "seq2seq",
                False,
                {"encoder": enc, "decoder": dec},
                dec.description or enc.description,
            )
            singles[group] = ServedEntry(info, dict(pair))
        return cls(singles)

    def get(self, name: str) -> ServedEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"no model {name!r}; known models: {sorted(self.entries)}")
        return entry

    def list(self) -> list[ModelInfo]:
        return [self.entries[n].info for n in sorted(self.entries)]
