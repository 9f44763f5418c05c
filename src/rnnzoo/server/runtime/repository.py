"""The model repository: every ``.onnx`` with a contract in a directory, checked and grouped.

A file that fails to load (no contract, bad contract, contract/graph mismatch, ORT cannot load
it) fails the whole load with its name and the fix: a repository is never half-served.
seq2seq halves (role ``encoder``/``decoder``) are grouped by ``group`` into one served model.

Files under a folder whose name starts with "." are not scanned: the zoo build stages and
quarantines unverified exports in ``NAME/.staging/``.

Parity records (``rnnzoo.parity_record``): a model whose ``NAME.parity.json`` beside it says
its parity failed, or judged other bytes than the file there, is refused with
``FailedPrecondition`` naming the file and the fix, unless ``allow_failed_parity`` (``rnnzoo
serve --allow-failed-parity``), which serves it with a warning. No record: loads as before.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from rnnzoo import parity_record
from rnnzoo.contract import Contract, read_contract
from rnnzoo.errors import FailedPrecondition, InvalidArgument, NotFound

from .model import ServedModel

log = logging.getLogger(__name__)

# The default for ``ModelRepository.from_dir(allow_failed_parity=None)``: ``rnnzoo serve
# --allow-failed-parity`` sets it for the serving task (threads started from it inherit it).
ALLOW_FAILED_PARITY: ContextVar[bool] = ContextVar("rnnzoo_allow_failed_parity", default=False)
# The default for ``from_dir(strict=None)``: True (a model that fails fails the load) for the
# library; ``rnnzoo serve`` sets it to its ``--strict`` flag (default off: a model that fails
# to load is listed not ready with its reason, and the others serve).
STRICT: ContextVar[bool] = ContextVar("rnnzoo_strict_load", default=True)
_ABS_PATH = re.compile(
    r"(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[^\s'\":,;()\[\]]+[/\\])+([^\s'\":,;()\[\]]+)"
)


def public_reason(text: str, model_dir: Path) -> str:
    """A load error as clients see it: paths under the model directory relative to it, any
    other absolute path cut to its file name (the server log keeps the whole text)."""
    for root in {str(model_dir.resolve()), str(model_dir)}:
        text = text.replace(root.rstrip("/") + "/", "")
    return _ABS_PATH.sub(r"\1", text)


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
    def __init__(self, entries: dict[str, ServedEntry], failed: dict[str, str] | None = None):
        self.entries = entries
        # models that failed to load (non-strict): name -> why, without server paths; never
        # half-served: none of their graphs is in ``entries``
        self.failed: dict[str, str] = dict(failed or {})

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        intra: int = 1,
        inter: int = 1,
        allow_failed_parity: bool | None = None,
        strict: bool | None = None,
    ) -> ModelRepository:
        d = Path(model_dir)
        if not d.is_dir():
            raise NotFound(f"model directory {d} does not exist; pass a directory of .onnx files")
        allow = ALLOW_FAILED_PARITY.get() if allow_failed_parity is None else allow_failed_parity
        # Recursive, so a zoo build directory (one folder per entry) serves as it is; hidden
        # folders (the build's .staging/ of unverified exports) are not part of it.
        files = sorted(
            f
            for f in d.rglob("*.onnx")
            if not any(p.startswith(".") for p in f.relative_to(d).parts[:-1])
        )
        if not files:
            raise NotFound(
                f"model directory {d} holds no .onnx files; export some with `rnnzoo export`"
            )
        strict = STRICT.get() if strict is None else strict
        failed: dict[str, str] = {}

        def fail(name: str, exc: Exception) -> None:
            if strict:
                raise exc
            log.error("model %r not served: %s", name, exc)
            failed.setdefault(name, public_reason(str(exc), d))

        contracts = []
        for f in files:
            try:
                contracts.append((f, read_contract(f)))
            except (InvalidArgument, NotFound, FailedPrecondition) as exc:
                fail(f.name.split(".")[0], exc)
        if strict:
            _check_parity(contracts, allow)
        else:
            kept = []
            for f, c in contracts:
                try:
                    _check_parity([(f, c)], allow)
                    kept.append((f, c))
                except FailedPrecondition as exc:
                    fail(c.group or c.name, exc)
            contracts = kept
        singles: dict[str, ServedEntry] = {}
        halves: dict[str, dict[str, ServedModel]] = {}
        for f, contract in contracts:
            try:
                graph = ServedModel(f, contract, intra, inter)
            except (InvalidArgument, FailedPrecondition) as exc:
                fail(contract.group or contract.name, exc)
                continue
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
            if group in failed:  # one half failed: the pair is not served at all
                continue
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
        if not singles and failed:
            raise FailedPrecondition(
                f"no model in {d} could be served: "
                + "; ".join(f"{n}: {why}" for n, why in sorted(failed.items()))
            )
        return cls(singles, failed)

    def get(self, name: str) -> ServedEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"no model {name!r}; known models: {sorted(self.entries)}")
        return entry

    def list(self) -> list[ModelInfo]:
        return [self.entries[n].info for n in sorted(self.entries)]


def _check_parity(contracts: list[tuple[Path, Contract]], allow: bool) -> None:
    """Refuse (or, when allowed, warn about) every file whose parity record does not vouch
    for it; all of them in one error."""
    refused = []
    for f, contract in contracts:
        verdict = parity_record.check(f, contract.group or contract.name)
        if verdict.servable:
            continue
        if allow:
            log.warning(
                "serving despite its parity record (--allow-failed-parity): %s", verdict.message
            )
        else:
            refused.append(verdict.message)
    if refused:
        raise FailedPrecondition(
            "refusing to serve models whose recorded parity failed or does not match the file:\n  "
            + "\n  ".join(refused)
            + "\nor serve them anyway with `rnnzoo serve --allow-failed-parity`"
        )
