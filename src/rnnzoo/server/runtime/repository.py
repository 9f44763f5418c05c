"""The model repository: every ``.onnx`` with a contract in a directory, checked and grouped,
by model and version (versions.py: Triton's ``NAME/VERSION/`` layout, ``version_policy``).

A file that fails to load (no contract, bad contract, contract/graph mismatch, ORT cannot load
it) fails the whole load with its name and the fix: a repository is never half-served.
seq2seq halves (role ``encoder``/``decoder``) are grouped by ``group`` into one served model.

Files under a folder whose name starts with "." are not scanned: the zoo build stages and
quarantines unverified exports in ``NAME/.staging/``.

Parity records (``rnnzoo.parity_record``): a model whose ``NAME.parity.json`` beside it says
its parity failed, or judged other bytes than the file there, is refused with
``FailedPrecondition`` naming the file and the fix, unless ``allow_failed_parity`` (``rnnzoo
serve --allow-failed-parity``), which serves it with a warning. No record: loads as before.

Versions: ``entries`` maps each model name to its newest ready version, and answers lookups of a
version's key (``NAME@VERSION``, versions.key_of) too: sessions hold the key of the version
they started on (``pin``), so a newer version never changes a live session. The table of every
version (``status``) says which are READY, UNAVAILABLE (with the reason) or DRAINING (retired,
its live sessions running on). Changes while serving (``prepare`` off the event loop, then
``apply``) are driven by model control (control.py).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from rnnzoo import parity_record
from rnnzoo.contract import Contract, read_contract
from rnnzoo.errors import FailedPrecondition, InvalidArgument, NotFound

from .model import ServedModel
from .redact import clip
from .versions import (
    KEY_SEP,
    VersionPolicy,
    fingerprint,
    key_of,
    model_folder,
    read_policy,
    version_files,
    version_of_file,
)

log = logging.getLogger(__name__)

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
class ControlOptions:
    """Model control, with Triton's names (docs/kserve.md "Model versions and control")."""

    mode: str = "none"  # none: loaded at start, never changed | poll | explicit
    poll_s: float = 15.0  # poll: seconds between scans of the repository
    load_models: tuple[str, ...] = ()  # explicit: the models loaded at start ("*": all)
    drain_timeout_s: float = 600.0  # a retired version's sessions run on at most this long

    def check(self) -> None:
        if self.mode not in ("none", "poll", "explicit"):
            raise InvalidArgument(f"model control {self.mode!r} is not one of none, poll, explicit")
        if not self.poll_s > 0:
            raise InvalidArgument(f"--repository-poll-secs must be > 0, got {self.poll_s}")
        if not self.drain_timeout_s >= 0:
            raise InvalidArgument(f"--drain-timeout must be >= 0, got {self.drain_timeout_s}")
        if self.load_models and self.mode != "explicit":
            raise InvalidArgument(
                "--load-model is for --model-control explicit (the other modes load every "
                "model in the repository)"
            )


@dataclass(frozen=True)
class LoadOptions:
    """How a model directory is loaded: passed explicitly from ``rnnzoo serve`` (its flags)
    through ``serve`` and ``Runtime.from_dir`` to ``ModelRepository.from_dir``."""

    # a model that fails to load fails the whole load (the library's default); ``rnnzoo
    # serve`` defaults to off: a model that fails is listed not ready with its reason
    strict: bool = True
    allow_failed_parity: bool = False  # serve models whose parity record says failed
    control: ControlOptions = field(default_factory=ControlOptions)


READY, UNAVAILABLE, DRAINING = "READY", "UNAVAILABLE", "DRAINING"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    streamable: bool
    contracts: dict[str, Contract]  # "model", or "encoder" + "decoder" for seq2seq
    description: str = ""
    version: int = 1

    @property
    def contract(self) -> Contract:
        """The single graph's contract (the decoder's for seq2seq)."""
        return self.contracts.get("model") or self.contracts["decoder"]

    @property
    def key(self) -> str:
        """This version's key in the repository (what a session pinned to it holds)."""
        return key_of(self.name, self.version)


@dataclass
class ServedEntry:
    info: ModelInfo
    graphs: dict[str, ServedModel] = field(default_factory=dict)  # role -> graph

    @property
    def is_seq2seq(self) -> bool:
        return "encoder" in self.graphs


@dataclass
class VersionStatus:
    """One version of one model, as RepositoryIndex lists it."""

    name: str
    version: int
    state: str  # READY | UNAVAILABLE | DRAINING (retired: READY for its live sessions only)
    reason: str = ""  # why it is not READY
    entry: ServedEntry | None = None  # READY and DRAINING versions
    cause: str = ""  # UNAVAILABLE: failed | policy | unloaded | drained
    retired_at: float = 0.0  # DRAINING: time.monotonic() when it was retired
    fingerprint: tuple[tuple[str, int, int], ...] = ()

    @property
    def key(self) -> str:
        return key_of(self.name, self.version)


class ServedEntries(dict[str, ServedEntry]):
    """name -> the entry of its newest READY version (what iteration yields); a lookup also
    takes a version's key ``NAME@VERSION`` (READY or DRAINING)."""

    def __init__(self, latest: dict[str, ServedEntry], keyed: dict[str, ServedEntry]) -> None:
        super().__init__(latest)
        self.keyed = keyed

    def __missing__(self, key: str) -> ServedEntry:
        return self.keyed[key]

    def get(self, key: str, default: ServedEntry | None = None) -> ServedEntry | None:  # type: ignore[override]
        found = dict.get(self, key)
        return found if found is not None else self.keyed.get(key, default)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self.keyed


Plan = dict[str, dict[int, VersionStatus]]


class ModelRepository:
    def __init__(
        self,
        entries: dict[str, ServedEntry],
        failed: dict[str, str] | None = None,
        *,
        model_dir: Path | None = None,
        intra: int = 1,
        inter: int = 1,
        allow_failed_parity: bool = False,
        control: ControlOptions | None = None,
    ):
        self.model_dir = model_dir
        self.intra, self.inter, self.allow = intra, inter, allow_failed_parity
        self.control = control or ControlOptions()
        self.table: dict[str, dict[int, VersionStatus]] = {}
        for name, entry in entries.items():
            v = entry.info.version
            self.table[name] = {v: VersionStatus(name, v, READY, entry=entry)}
        for name, why in (failed or {}).items():
            self.table.setdefault(name, {})[1] = VersionStatus(
                name, 1, UNAVAILABLE, why, cause="failed"
            )
        self.entries = ServedEntries({}, {})
        # models that failed to load (non-strict): name -> why, without server paths; never
        # half-served: none of their graphs is in ``entries``
        self.failed: dict[str, str] = {}
        self.generation = 0  # bumped by every change (the servicers' caches follow it)
        self._publish()

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        intra: int = 1,
        inter: int = 1,
        allow_failed_parity: bool = False,
        strict: bool = True,
        control: ControlOptions | None = None,
    ) -> ModelRepository:
        d = Path(model_dir)
        if not d.is_dir():
            raise NotFound(f"model directory {d} does not exist; pass a directory of .onnx files")
        allow = allow_failed_parity
        control = ControlOptions() if control is None else control
        control.check()
        files = _model_files(d)
        if not files:
            raise NotFound(
                f"model directory {d} holds no .onnx files; export some with `rnnzoo export`"
            )
        repo = cls(
            {}, model_dir=d, intra=intra, inter=inter, allow_failed_parity=allow, control=control
        )
        names = None
        if control.mode == "explicit" and "*" not in control.load_models:
            names = set(control.load_models)
        plan = repo.prepare(names, strict=strict, files=files)
        unknown = sorted((names or set()) - set(plan))
        if unknown:
            raise NotFound(
                f"--load-model {unknown[0]!r}: no such model in {d} (models there: "
                f"{sorted(plan)}); load one of those"
            )
        repo.apply(plan, full=True)
        if not repo.entries and repo.failed:
            raise FailedPrecondition(
                f"no model in {d} could be served: "
                + "; ".join(f"{n}: {why}" for n, why in sorted(repo.failed.items()))
            )
        return repo

    # ---- lookups -----------------------------------------------------------------------------
    def split(self, key: str) -> tuple[str, int | None]:
        """(model name, version) of a version's key; (name, None) for a plain name."""
        if key not in self.table and KEY_SEP in key:
            name, _, v = key.rpartition(KEY_SEP)
            if v.isdigit() and name in self.table:
                return name, int(v)
        return key, None

    def name_of(self, key: str) -> str:
        return self.split(key)[0]

    def latest(self, name: str) -> VersionStatus | None:
        ready = [vs for vs in self.table.get(name, {}).values() if vs.state == READY]
        return max(ready, key=lambda vs: vs.version) if ready else None

    def served_versions(self, name: str) -> list[int]:
        return sorted(v for v, vs in self.table.get(name, {}).items() if vs.state == READY)

    def get(self, name: str) -> ServedEntry:
        """The entry of a model (its newest READY version) or of a version's key, READY or
        DRAINING; otherwise the error that says why not."""
        entry = self.entries.get(name)
        if entry is not None:
            return entry
        base, v = self.split(name)
        if v is not None:
            vs = self.table[base].get(v)
            if vs is None:
                raise NotFound(
                    f"model {clip(base)!r} has no version {v}; it serves versions "
                    f"{self.served_versions(base)}"
                )
            raise self._not_ready(vs)
        versions = self.table.get(name)
        if not versions:
            raise NotFound(f"no model {clip(name)!r}; known models: {sorted(self.entries)}")
        if name in self.failed:
            raise FailedPrecondition(
                f"model {clip(name)!r} is not ready: it failed to load ({self.failed[name]}); "
                "the server's log has the details"
            )
        newest = max(versions.values(), key=lambda vs: vs.version)
        raise self._not_ready(newest)

    def _not_ready(self, vs: VersionStatus) -> FailedPrecondition:
        what = f"version {vs.version} of model {clip(vs.name)!r}"
        latest = self.latest(vs.name)
        instead = (
            f"version {latest.version} serves new work (leave the version empty to get it)"
            if latest is not None
            else "no version of it serves now"
        )
        if vs.state == DRAINING:
            return FailedPrecondition(
                f"{what} is retired ({vs.reason}): it takes no new work, only its live "
                f"sessions run on (at most --drain-timeout {self.control.drain_timeout_s:g} s); "
                f"{instead}"
            )
        if vs.cause == "drained":
            return FailedPrecondition(
                f"{what} was retired ({vs.reason}) and its sessions' drain time ran out "
                f"(--drain-timeout {self.control.drain_timeout_s:g} s): it serves nothing now; "
                f"start a new session: {instead}"
            )
        return FailedPrecondition(f"{what} is not ready: {vs.reason}; {instead}")

    def resolve(self, name: str, version: str | int = "", live: bool = False) -> str:
        """The key new work on ``name`` goes to: ``version`` ("" or 0: the newest READY one)
        if it is READY; errors say why not and which versions serve. ``live``: for a request
        of a live sequence (which runs on its session's version): a DRAINING version will do."""
        if version in ("", 0):
            latest = self.latest(name)
            if latest is None and live:
                draining = [vs for vs in self.table.get(name, {}).values() if vs.state == DRAINING]
                latest = max(draining, key=lambda vs: vs.version) if draining else None
            if latest is None:
                self.get(name)  # raises: unknown, failed, unloaded or retired
                raise AssertionError("unreachable")  # pragma: no cover
            return latest.key
        v = version
        if isinstance(v, str):
            if not v.isdigit():
                raise InvalidArgument(
                    f"model version {clip(v)!r} is not a version number; send a number such "
                    f"as {self.served_versions(name) or [1]} or leave it empty for the newest"
                )
            v = int(v)
        if name not in self.table:
            self.get(name)  # raises NotFound
        vs = self.table[name].get(v)
        if vs is None:
            raise NotFound(
                f"model {clip(name)!r} has no version {v}; it serves versions "
                f"{self.served_versions(name)}"
            )
        if vs.state != READY and not (live and vs.state == DRAINING):
            raise self._not_ready(vs)
        return vs.key

    def pin(self, model: str) -> str:
        """The key a new session on ``model`` (a name or a version's key) holds."""
        name, v = self.split(model)
        return self.resolve(name, v or "")

    def status(self) -> list[VersionStatus]:
        """Every version of every model, by name then version."""
        return [
            vs
            for name in sorted(self.table)
            for _, vs in sorted(self.table[name].items(), reverse=False)
        ]

    def draining(self) -> list[VersionStatus]:
        return [vs for vs in self.status() if vs.state == DRAINING]

    # ---- changes -----------------------------------------------------------------------------
    def prepare(
        self,
        names: set[str] | None = None,
        *,
        strict: bool = False,
        files: list[Path] | None = None,
    ) -> Plan:
        """Scan the repository and load what changed (slow: run it off the event loop);
        ``apply`` then makes it current. ``names``: only these models are loaded (others on
        disk are listed unloaded). Versions already READY are kept as they are."""
        d = self.model_dir
        if d is None:
            raise FailedPrecondition("this repository was not read from a directory")
        if files is None:
            files = _model_files(d) if d.is_dir() else []
        found: dict[str, dict[int, list[tuple[Path, Contract]]]] = {}
        broken: dict[str, dict[int, str]] = {}
        folders: dict[str, Path] = {}
        for f in files:
            v = version_of_file(d, f)
            try:
                c = read_contract(f)
            except (InvalidArgument, NotFound, FailedPrecondition) as exc:
                if strict:
                    raise
                name = f.name.split(".")[0]
                log.error("model %r version %d not served: %s", name, v, exc)
                broken.setdefault(name, {}).setdefault(v, public_reason(str(exc), d))
                folders.setdefault(name, model_folder(d, f))
                continue
            name = c.group or c.name
            found.setdefault(name, {}).setdefault(v, []).append((f, c))
            folders.setdefault(name, model_folder(d, f))
        if strict:
            _check_parity(
                [p for vs in found.values() for ps in vs.values() for p in ps], self.allow
            )
        plan: Plan = {}
        for name in sorted(set(found) | set(broken)):
            versions = sorted(set(found.get(name, {})) | set(broken.get(name, {})), reverse=True)
            if names is not None and name not in names:
                plan[name] = {
                    v: VersionStatus(
                        name,
                        v,
                        UNAVAILABLE,
                        "not loaded (--model-control explicit: load it with RepositoryModelLoad)",
                        cause="unloaded",
                    )
                    for v in versions
                }
                continue
            try:
                # a flat repository's files share its root: no one model's config.pbtxt there
                policy = VersionPolicy() if folders[name] == d else read_policy(folders[name])
            except InvalidArgument as exc:
                if strict:
                    raise
                why = public_reason(str(exc), d)
                plan[name] = {
                    v: VersionStatus(name, v, UNAVAILABLE, why, cause="failed") for v in versions
                }
                continue
            plan[name] = self._plan_model(
                name, versions, found.get(name, {}), broken.get(name, {}), policy, strict
            )
        return plan

    def _plan_model(
        self,
        name: str,
        versions: list[int],
        found: dict[int, list[tuple[Path, Contract]]],
        broken: dict[int, str],
        policy: VersionPolicy,
        strict: bool,
    ) -> dict[int, VersionStatus]:
        d = self.model_dir
        assert d is not None
        current = self.table.get(name, {})
        out: dict[int, VersionStatus] = {}
        ready = 0
        for v in versions:  # newest first
            pairs = found.get(v, [])
            fp = fingerprint(version_files(d, pairs[0][0])) if pairs else ()
            if v in broken:
                out[v] = VersionStatus(name, v, UNAVAILABLE, broken[v], cause="failed")
                continue
            if not policy.wants(v) or policy.enough(ready):
                out[v] = VersionStatus(
                    name,
                    v,
                    UNAVAILABLE,
                    f"not served by its version_policy ({policy.describe()})",
                    cause="policy",
                )
                continue
            cur = current.get(v)
            if cur is not None and cur.state == DRAINING and cur.fingerprint == fp:
                # retired, and wanted again (loaded again, its folder back): the same graphs
                out[v] = VersionStatus(name, v, READY, entry=cur.entry, fingerprint=fp)
                ready += 1
                continue
            if cur is not None and cur.state == READY:
                if cur.fingerprint and fp != cur.fingerprint:
                    log.warning(
                        "model %r version %d changed on disk while served; a served version is "
                        "not reloaded (its sessions rely on it): add a new version folder",
                        name,
                        v,
                    )
                out[v] = cur
                ready += 1
                continue
            try:
                if not strict:
                    _check_parity(pairs, self.allow)
                entry = _build(name, v, pairs, self.intra, self.inter)
            except (InvalidArgument, FailedPrecondition, NotFound) as exc:
                if strict:
                    raise
                log.error("model %r version %d not served: %s", name, v, exc)
                why = public_reason(str(exc), d)
                out[v] = VersionStatus(name, v, UNAVAILABLE, why, cause="failed", fingerprint=fp)
                continue
            out[v] = VersionStatus(name, v, READY, entry=entry, fingerprint=fp)
            ready += 1
        return out

    def apply(self, plan: Plan, *, full: bool, now: float | None = None) -> list[str]:
        """Make ``plan`` current (on the event loop). A READY version the plan does not serve
        any more is retired: DRAINING, its sessions run on. ``full``: the plan covers the whole
        repository (models missing from it were removed). Returns the changes, as sentences."""
        now = time.monotonic() if now is None else now
        changes: list[str] = []
        names = set(plan) | (set(self.table) if full else set())
        for name in sorted(names):
            old = self.table.get(name, {})
            new = dict(plan.get(name, {}))
            for v, vs in old.items():
                gone = new.get(v)
                if vs.state == DRAINING:
                    if gone is not None and gone.state == READY and gone.entry is vs.entry:
                        changes.append(f"model {name!r} version {v} serves again")
                        continue  # its live sessions simply go on
                    new[v] = vs  # until it drains; changed files are loaded after that
                elif vs.state == READY and (gone is None or gone.state != READY):
                    fp0 = vs.fingerprint
                    why = "its folder was removed" if gone is None else gone.reason
                    if gone is not None and gone.cause == "unloaded":
                        why = "unloaded"
                    new[v] = VersionStatus(
                        name, v, DRAINING, why, entry=vs.entry, retired_at=now, fingerprint=fp0
                    )
                    changes.append(f"model {name!r} version {v} retired ({why})")
            for v, vs in new.items():
                before = old.get(v)
                if vs.state == READY and (before is None or before.state != READY):
                    changes.append(f"model {name!r} version {v} loaded")
                elif vs.cause == "failed" and (before is None or before.reason != vs.reason):
                    changes.append(f"model {name!r} version {v} not served: {vs.reason}")
            if new:
                self.table[name] = new
            else:
                self.table.pop(name, None)
        self._publish()
        return changes

    def unload(self, name: str, now: float | None = None) -> list[str]:
        """Retire every version of ``name`` (explicit model control)."""
        if name not in self.table:
            self.get(name)  # raises NotFound
        plan = {
            name: {
                v: VersionStatus(name, v, UNAVAILABLE, "unloaded", cause="unloaded")
                for v in self.table[name]
            }
        }
        return self.apply(plan, full=False, now=now)

    def drop(self, vs: VersionStatus, reason: str) -> None:
        """A drained version: gone from ``entries``; its key now says why."""
        self.table[vs.name][vs.version] = VersionStatus(
            vs.name, vs.version, UNAVAILABLE, reason, cause="drained"
        )
        self._publish()

    def _publish(self) -> None:
        latest: dict[str, ServedEntry] = {}
        keyed: dict[str, ServedEntry] = {}
        failed: dict[str, str] = {}
        for name, versions in self.table.items():
            newest = self.latest(name)
            if newest is not None and newest.entry is not None:
                latest[name] = newest.entry
            for vs in versions.values():
                if vs.state in (READY, DRAINING) and vs.entry is not None:
                    keyed[vs.key] = vs.entry
            if newest is None:
                reasons = [vs for vs in versions.values() if vs.cause == "failed"]
                if reasons:
                    failed[name] = max(reasons, key=lambda vs: vs.version).reason
        self.entries = ServedEntries(latest, keyed)
        self.failed = failed
        self.generation += 1

    # last in the class: a method named ``list`` would shadow the builtin in the annotations
    # of the methods after it
    def list(self) -> list[ModelInfo]:
        return [self.entries[n].info for n in sorted(self.entries)]


def _model_files(d: Path) -> list[Path]:
    # Recursive, so a zoo build directory (one folder per entry) serves as it is; hidden
    # folders (the build's .staging/ of unverified exports) are not part of it.
    return sorted(
        f
        for f in d.rglob("*.onnx")
        if not any(p.startswith(".") for p in f.relative_to(d).parts[:-1])
    )


def _build(
    name: str, version: int, pairs: list[tuple[Path, Contract]], intra: int, inter: int
) -> ServedEntry:
    """One version of one model from its files: a single graph, or a seq2seq pair."""
    graphs: dict[str, ServedModel] = {}
    for f, contract in pairs:
        if contract.role == "model":
            if graphs:
                other = next(iter(graphs.values())).path
                raise InvalidArgument(
                    f"{f}: model name {contract.name!r} is also used by {other}; rename one in "
                    "its contract"
                )
            graphs["model"] = ServedModel(f, contract, intra, inter)
            continue
        if contract.role in graphs:
            raise InvalidArgument(
                f"{f}: group {contract.group!r} already has a {contract.role} "
                f"({graphs[contract.role].path}); each group needs exactly one of each"
            )
        if "model" in graphs:
            raise InvalidArgument(f"{f}: name {name!r} is used twice")
        graphs[contract.role] = ServedModel(f, contract, intra, inter)
    if "model" in graphs:
        c = graphs["model"].contract
        info = ModelInfo(c.name, c.task, c.streamable, {"model": c}, c.description, version)
        return ServedEntry(info, graphs)
    missing = {"encoder", "decoder"} - set(graphs)
    if missing:
        have = next(iter(graphs.values())).path
        raise InvalidArgument(
            f"{have}: seq2seq group {name!r} has no {sorted(missing)[0]} graph; put "
            f"{name}.{sorted(missing)[0]}.onnx next to it"
        )
    enc, dec = graphs["encoder"].contract, graphs["decoder"].contract
    if len(enc.states) != len(dec.states):
        raise InvalidArgument(
            f"{graphs['encoder'].path}: encoder has {len(enc.states)} states, decoder "
            f"{len(dec.states)}; encoder state outputs map by position onto decoder inputs"
        )
    for key in ("bos", "eos"):
        if key not in dec.special_tokens:
            raise InvalidArgument(
                f"{graphs['decoder'].path}: special_tokens lacks {key!r}; add it to the contract"
            )
    info = ModelInfo(
        name,
        "seq2seq",
        False,
        {"encoder": enc, "decoder": dec},
        dec.description or enc.description,
        version,
    )
    return ServedEntry(info, graphs)


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
