"""The zoo: named entries whose task, model and training hyperparameters are plain data.

``build_zoo`` trains every entry (or ``only`` some), writes ``OUT/NAME/model.pt`` and
``OUT/NAME/metrics.json`` per entry and the card ``OUT/ZOO.md`` with its pictures.

Plug-in point for later steps (export, verification): ``after_train`` is a list of callables
``hook(entry, ckpt_path, out_dir) -> dict``, called once per entry after its checkpoint is
written, with ``out_dir = OUT/NAME``. The dicts they return are merged into the entry's
``metrics.json`` under ``"extra"`` and shown in the card's per-model details; a hook that
raises an ``RnnzooError`` fails that entry: the build goes on with the others, writes the card
and then fails naming every failed entry.

Resumable: each entry has a config hash (``config_hash``: its resolved task/model/train config,
quick or not, and ``BUILD_FORMAT``), recorded in its checkpoint (``ckpt["build"]``) and its
``metrics.json``. An entry whose checkpoint and metrics carry the hash, and whose every hook
says its own output is current (a hook may have an ``is_current(entry, ckpt_path, out_dir) ->
bool`` attribute; one without it is always rerun), is "up to date": nothing is redone and its
card row comes from ``metrics.json``. A matching checkpoint with stale hook output reruns the
hooks only; anything else retrains. ``force=True`` retrains regardless.

Progress: one line per entry and stage, ``[3/12] char-gru: training ... done 41s``, through
``log``; hooks report their own stages with ``stage(...)``/``progress(...)``.

Floors (what a full build must reach) are data too: ``{"max_ratio": r}`` (metric / baseline
at most r), ``{"min_value": v}``, or ``{"beats": OTHER}`` (higher metric than entry OTHER).
Quick builds (``quick=True``) train tiny versions for tests and CI; their floors are reported
but not claimed or enforced.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnzoo.errors import FailedPrecondition, NotFound, RnnzooError

DEFAULT_OUT = "zoo"
Hook = Callable[[Any, Path, Path], dict[str, Any]]
# Part of every config hash: bump it when a change to the code makes old builds stale.
BUILD_FORMAT = "rnnzoo.build/1"

# Where progress lines go: set by the build for the entry it is working on ("[i/n] NAME: ").
_PROGRESS: ContextVar[Callable[[str], None] | None] = ContextVar("rnnzoo_progress", default=None)


def progress(msg: str) -> None:
    """One progress line for the entry being built (nothing outside a build)."""
    log = _PROGRESS.get()
    if log is not None:
        log(msg)


def build_progress() -> Callable[[str], None] | None:
    """Where the build sends the current entry's progress lines (None outside a build)."""
    return _PROGRESS.get()


def _secs(s: float) -> str:
    return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"


@contextmanager
def stage(what: str, log: Callable[[str], None] | None = None) -> Iterator[dict[str, str]]:
    """``what ...`` now, ``what ... done 12s`` after; the body may set ``["result"]`` (the
    word(s) instead of "done"). A body that raises ends the line with "failed" (or the result
    it set)."""
    say = log or progress
    result = {"result": "done"}
    t0 = time.perf_counter()
    say(f"{what} ...")
    try:
        yield result
    except BaseException:
        failed = result["result"] if result["result"] != "done" else "failed"
        say(f"{what} ... {failed} {_secs(time.perf_counter() - t0)}")
        raise
    say(f"{what} ... {result['result']} {_secs(time.perf_counter() - t0)}")


@dataclass(frozen=True)
class Entry:
    name: str
    group: str  # card section: forecast, lm, longrange, tagging, seq2seq
    task: str  # task registry name (rnnzoo.models.tasks.TASKS)
    model: dict[str, Any]  # config fields the task does not fix (cell, hidden_size, ...)
    train: dict[str, Any]  # TrainConfig fields
    floor: dict[str, Any]
    task_params: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, dict[str, Any]] = field(default_factory=dict)  # overrides: task/model/train
    notes: str = ""

    def resolved(self, quick: bool = False) -> tuple[dict, dict, dict]:
        """(task_params, model, train) with the quick overrides applied when asked."""
        q = self.quick if quick else {}
        return (
            {**self.task_params, **q.get("task", {})},
            {**self.model, **q.get("model", {})},
            {**self.train, **q.get("train", {})},
        )

    def make_task(self, quick: bool = False):
        """The entry's task (cached: entries sharing a task share its data)."""
        return _cached_task(self.task, json.dumps(self.resolved(quick)[0], sort_keys=True))

    def model_config(self, quick: bool = False) -> dict[str, Any]:
        """The full model config dict: the entry's fields plus what the task fixes."""
        task = self.make_task(quick)
        return {**self.resolved(quick)[1], **task.model_io()}

    @property
    def family(self) -> str:
        from rnnzoo.models.tasks import task_class

        return task_class(self.task).family

    @property
    def config(self):
        """The RNNConfig/Seq2SeqConfig of the full entry (builds its task: reads data)."""
        from rnnzoo.models.rnn import RNNConfig, Seq2SeqConfig

        cls = Seq2SeqConfig if self.family == "seq2seq" else RNNConfig
        return cls(**self.model_config())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "task": self.task,
            "task_params": self.task_params,
            "model": self.model,
            "train": self.train,
            "floor": self.floor,
            "quick": self.quick,
            "notes": self.notes,
        }


def config_hash(entry: Entry, quick: bool = False) -> str:
    """sha256 of what an entry's build depends on: its resolved task/model/train config (train
    defaults filled in), quick or not, and ``BUILD_FORMAT``."""
    from rnnzoo.models.train import TrainConfig

    task_params, model, train = entry.resolved(quick)
    data = {
        "format": BUILD_FORMAT,
        "name": entry.name,
        "family_task": entry.task,
        "task_params": task_params,
        "model": model,
        "train": TrainConfig(**train).to_dict(),
        "quick": bool(quick),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=16)
def _cached_task(name: str, params_json: str):
    """Entries sharing a task and its parameters share one built task (corpus read once)."""
    from rnnzoo.models.tasks import make_task

    return make_task(name, **json.loads(params_json))


# ---- the entries ---------------------------------------------------------------------------
# The long-range entries share one training budget so the comparison is fair.
_LONGRANGE_TRAIN = {
    "steps": 1200,
    "batch_size": 64,
    "lr": 1e-2,
    "clip": 1.0,
    "seed": 0,
    "probe_every": 50,
    "log_every": 25,
}
_LONGRANGE_QUICK = {"train": {"steps": 30, "probe_every": 10, "log_every": 5}}
_CHAR_QUICK = {
    "task": {"eval_chars": 4000},
    "model": {"hidden_size": 32},
    "train": {"steps": 20, "batch_size": 8},
}
_TAG_QUICK = {"task": {"train_chars": 60_000, "eval_chars": 8000}, "train": {"steps": 20}}


def _longrange(name: str, cell: str, notes: str, floor: dict[str, Any]) -> Entry:
    return Entry(
        name=name,
        group="longrange",
        task="adding",
        task_params={"seq_len": 100},
        model={"cell": cell, "hidden_size": 64},
        train=_LONGRANGE_TRAIN,
        floor=floor,
        quick=_LONGRANGE_QUICK,
        notes=notes,
    )


ENTRIES: list[Entry] = [
    Entry(
        name="sine-rnn",
        group="forecast",
        task="sines",
        model={"cell": "rnn_tanh", "hidden_size": 64},
        train={"steps": 600, "batch_size": 32, "lr": 3e-3, "seed": 0},
        floor={"max_ratio": 0.3},
        quick={"train": {"steps": 30}, "task": {"eval_size": 64}},
        notes="vanilla tanh RNN forecaster",
    ),
    Entry(
        name="sine-gru-scratch",
        group="forecast",
        task="sines",
        model={"cell": "gru_scratch", "hidden_size": 32},
        train={"steps": 300, "batch_size": 32, "lr": 5e-3, "seed": 0},
        floor={"max_ratio": 0.3},
        quick={"train": {"steps": 10}, "task": {"eval_size": 64}},
        notes="the hand-written GRU cell (models/cells.py)",
    ),
    Entry(
        name="char-gru",
        group="lm",
        task="charlm",
        model={"cell": "gru", "hidden_size": 256, "embed_size": 32},
        task_params={"seq_len": 64},
        train={"steps": 450, "batch_size": 64, "lr": 4e-3, "seed": 0},
        floor={"max_ratio": 0.6},
        quick=_CHAR_QUICK,
        notes="1-layer GRU character LM",
    ),
    Entry(
        name="char-lstm-deep",
        group="lm",
        task="charlm",
        model={"cell": "lstm", "hidden_size": 192, "num_layers": 2, "embed_size": 32},
        task_params={"seq_len": 64},
        train={"steps": 450, "batch_size": 64, "lr": 4e-3, "seed": 0},
        floor={"max_ratio": 0.6},
        quick=_CHAR_QUICK,
        notes="2-layer LSTM character LM",
    ),
    _longrange("adding-rnn", "rnn_tanh", "tanh RNN: gradients vanish over ~90 steps", {}),
    _longrange("adding-rnn-relu", "rnn_relu", "ReLU RNN, same budget", {}),
    _longrange("adding-gru", "gru", "GRU, same budget", {"max_ratio": 0.1}),
    _longrange("adding-lstm", "lstm", "LSTM, same budget", {"max_ratio": 0.1}),
    Entry(
        name="tag-gru",
        group="tagging",
        task="pytag",
        model={"cell": "gru", "hidden_size": 64, "embed_size": 32},
        train={"steps": 400, "batch_size": 32, "lr": 5e-3, "seed": 0},
        floor={},
        quick=_TAG_QUICK,
        notes="unidirectional twin of tag-bigru",
    ),
    Entry(
        name="tag-bigru",
        group="tagging",
        task="pytag",
        model={"cell": "gru", "hidden_size": 64, "embed_size": 32, "bidirectional": True},
        train={"steps": 400, "batch_size": 32, "lr": 5e-3, "seed": 0},
        floor={"beats": "tag-gru"},
        quick=_TAG_QUICK,
        notes="bidirectional GRU tagger",
    ),
    Entry(
        name="tag-bilstm",
        group="tagging",
        task="pytag",
        model={"cell": "lstm", "hidden_size": 64, "embed_size": 32, "bidirectional": True},
        train={"steps": 400, "batch_size": 32, "lr": 5e-3, "seed": 0},
        floor={"beats": "tag-gru"},
        quick=_TAG_QUICK,
        notes="bidirectional LSTM tagger",
    ),
    Entry(
        name="num2words",
        group="seq2seq",
        task="num2words",
        model={"cell": "gru", "hidden_size": 128, "embed_size": 32},
        train={"steps": 1200, "batch_size": 64, "lr": 5e-3, "seed": 0},
        floor={"min_value": 0.9},
        quick={"train": {"steps": 30}, "task": {"eval_per_length": 20}},
        notes="GRU encoder-decoder, greedy decoding",
    ),
]
REGISTRY: dict[str, Entry] = {e.name: e for e in ENTRIES}


def get_entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise NotFound(f"unknown zoo entry {name!r}; known entries: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def select(only: Iterable[str] | None = None) -> list[Entry]:
    """Entries in registry order (twins before the entries that must beat them)."""
    if not only:
        return list(ENTRIES)
    wanted = {get_entry(n).name for n in only}  # raises on the first unknown name
    return [e for e in ENTRIES if e.name in wanted]


# ---- training one entry ------------------------------------------------------------------
def train_entry(
    entry: Entry, *, quick: bool = False, progress: bool | None = None, threads: int = 1
):
    """Train ``entry``; returns (model, checkpoint dict).

    ``threads``: torch intra-op threads while training. 1 by default: these small recurrent
    nets run tiny kernels per time step, and on shared cores OpenMP threads spin-wait for
    each other (a GRU step was measured 50x slower with 2 threads on a busy 2-core machine).
    """
    import torch

    from rnnzoo.models.checkpoint import make_checkpoint
    from rnnzoo.models.train import TrainConfig, build_model, train

    task_params, _, train_kw = entry.resolved(quick)
    task = entry.make_task(quick)
    cfg = TrainConfig(**train_kw)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)  # the initial weights
        model = build_model(task.family, entry.model_config(quick))
        info = train(model, task, cfg, progress=progress, desc=entry.name)
        t0 = time.perf_counter()
        evaluation = task.evaluate(model)
    finally:
        torch.set_num_threads(before)
    metrics = {
        **evaluation.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "eval_seconds": time.perf_counter() - t0,
        "quick": quick,
    }
    meta = {**task.metadata(), "params": task_params}
    ckpt = make_checkpoint(entry.name, task.family, model, meta, metrics, info)
    return model, ckpt


def check_floor(entry: Entry, metrics: dict[str, Any], others: dict[str, dict]) -> dict:
    """{"met": True/False/None, "text": ...}; None when the entry has no floor to check."""
    floor = entry.floor
    if "max_ratio" in floor:
        met = metrics["ratio"] <= floor["max_ratio"]
        return {"met": met, "text": f"{metrics['metric']} <= {floor['max_ratio']} x baseline"}
    if "min_value" in floor:
        met = metrics["value"] >= floor["min_value"]
        return {"met": met, "text": f"{metrics['metric']} >= {floor['min_value']}"}
    if "beats" in floor:
        other = others.get(floor["beats"])
        text = f"{metrics['metric']} > {floor['beats']}"
        if other is None:
            return {"met": None, "text": text + " (not built: unchecked)"}
        return {"met": metrics["value"] > other["value"], "text": text + f" ({other['value']:.4f})"}
    return {"met": None, "text": "none (shown for comparison)"}


def _previous_result(out: Path, name: str) -> dict | None:
    """An earlier build's result for ``name`` in ``out`` (its metrics.json), if readable."""
    path = out / name / "metrics.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    needed = ("metrics", "floor", "train", "config", "entry", "task", "extra", "quick")
    return result if isinstance(result, dict) and all(k in result for k in needed) else None


def _previous_metrics(out: Path, name: str, quick: bool) -> dict | None:
    """An earlier build's metrics, only if it was built the same way (quick or full)."""
    result = _previous_result(out, name)
    return result["metrics"] if result and result["quick"] == quick else None


def build_zoo(
    out: str | Path = DEFAULT_OUT,
    only: Iterable[str] | None = None,
    quick: bool = False,
    after_train: Iterable[Hook] = (),
    *,
    progress: bool | None = None,
    threads: int = 1,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Train the entries that are not up to date, run the hooks, write metrics and the card.

    ``force``: retrain and rerun the hooks even for entries that are up to date.
    Raises ``FailedPrecondition`` naming every entry whose hook failed, and (full builds only)
    every entry that missed its floor; the card is written first.
    """

    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = select(only)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)  # for the hooks and the card too (see train_entry)
    try:
        return _build(out, entries, quick, list(after_train), progress, threads, log, force)
    finally:
        torch.set_num_threads(threads_before)


def _matching_checkpoint(path: Path, want: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it is readable and was built from config hash ``want``."""
    from rnnzoo.models.checkpoint import read_checkpoint

    if not path.is_file():
        return None
    try:
        ckpt = read_checkpoint(path)
    except RnnzooError:
        return None
    build = ckpt.get("build")
    return ckpt if isinstance(build, dict) and build.get("config_hash") == want else None


def _hook_current(hook: Hook, entry: Entry, ckpt_path: Path) -> bool:
    is_current = getattr(hook, "is_current", None)
    if is_current is None:
        return False
    try:
        return bool(is_current(entry, ckpt_path, ckpt_path.parent))
    except (RnnzooError, OSError, ValueError):
        return False


def _metrics_line(metrics: dict[str, Any]) -> str:
    return (
        f"{metrics['metric']}={metrics['value']:.4g} (baseline {metrics['baseline']:.4g}, "
        f"ratio {metrics['ratio']:.3f})"
    )


def _build(
    out: Path,
    entries: list[Entry],
    quick: bool,
    hooks: list[Hook],
    progress_bar: bool | None,
    threads: int,
    log: Callable[[str], None],
    force: bool,
) -> list[dict[str, Any]]:
    from rnnzoo.models.card import write_card
    from rnnzoo.models.checkpoint import save_checkpoint

    results: list[dict[str, Any]] = []
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}  # entry -> what its hook said
    counts = {"trained": 0, "up to date": 0, "rerun hooks": 0}
    t_all = time.perf_counter()
    n = len(entries)
    for i, entry in enumerate(entries, 1):
        prefix = f"[{i}/{n}] {entry.name}: "
        token = _PROGRESS.set(lambda msg, prefix=prefix: log(prefix + msg))
        try:
            result = _build_entry(out, entry, quick, hooks, progress_bar, threads, force, done,
                                  failed, counts, save_checkpoint)  # fmt: skip
        finally:
            _PROGRESS.reset(token)
        if result is not None:
            results.append(result)
    total = time.perf_counter() - t_all
    # The card covers every entry built into OUT, not only this run's (`rnnzoo train NAME`
    # into a built zoo updates one row).
    built = {r["name"]: r for r in results}
    rows = [built.get(n) or _previous_result(out, n) for n in REGISTRY]
    rows = [r for r in rows if r is not None]
    card = write_card(out, rows, quick=quick, total_seconds=total)
    log(
        f"wrote {card} ({counts['trained']} trained, {counts['up to date']} up to date, "
        f"{counts['rerun hooks']} redone from their checkpoint, {len(failed)} failed; {len(rows)} on the "
        f"card; {total:.0f}s)"
    )
    problems = [f"zoo entry {name}: {msg}" for name, msg in failed.items()]
    missed = [r["name"] for r in results if r["floor"]["met"] is False]
    if missed and not quick:
        problems.append(
            f"zoo entries missed their floor: {', '.join(missed)} (see {card}); "
            "tune their hyperparameters in rnnzoo/models/zoo.py"
        )
    if problems:
        if failed:
            problems.append(
                "the other entries are built and served; after the fix, `rnnzoo zoo build` "
                "redoes only what is not up to date"
            )
        raise FailedPrecondition("\n".join(problems))
    return results


def _build_entry(
    out: Path,
    entry: Entry,
    quick: bool,
    hooks: list[Hook],
    progress_bar: bool | None,
    threads: int,
    force: bool,
    done: dict[str, dict],
    failed: dict[str, str],
    counts: dict[str, int],
    save_checkpoint: Callable[[dict, Path], Path],
) -> dict[str, Any] | None:
    """Build one entry (or find it up to date); its metrics.json row, None if a hook failed
    before any row could be written."""
    t0 = time.perf_counter()
    h = config_hash(entry, quick)
    ckpt_path = out / entry.name / "model.pt"
    ckpt = None if force else _matching_checkpoint(ckpt_path, h)
    prev = _previous_result(out, entry.name)
    current = (
        ckpt is not None
        and prev is not None
        and prev.get("config_hash") == h
        and all(_hook_current(hook, entry, ckpt_path) for hook in hooks)
    )
    if current:
        assert prev is not None
        result = {
            **prev,
            "floor": check_floor(entry, prev["metrics"], _others(out, entry, done, quick)),
        }
        _write_result(out, result)
        done[entry.name] = result["metrics"]
        counts["up to date"] += 1
        progress(f"up to date (config {h[:12]}): not trained, exported or verified again")
        return result
    if ckpt is None:
        with stage("training") as st:
            _, ckpt = train_entry(entry, quick=quick, progress=progress_bar, threads=threads)
            ckpt["build"] = {"format": BUILD_FORMAT, "config_hash": h}
            save_checkpoint(ckpt, ckpt_path)
            st["result"] = f"done ({_metrics_line(ckpt['metrics'])})"
        counts["trained"] += 1
    else:
        progress(f"training ... up to date (checkpoint has config {h[:12]}), not retrained")
        counts["rerun hooks"] += 1
    extra: dict[str, Any] = {}
    for hook in hooks:
        try:
            extra.update(hook(entry, ckpt_path, ckpt_path.parent) or {})
        except RnnzooError as exc:
            failed[entry.name] = str(exc)
            extra.update({"parity_ok": False, "error": str(exc).splitlines()[0]})
            break
    metrics = ckpt["metrics"]
    done[entry.name] = metrics
    floor = check_floor(entry, metrics, _others(out, entry, done, quick))
    result = {
        "name": entry.name,
        "entry": entry.to_dict(),
        "config_hash": h,
        "family": ckpt["family"],
        "config": ckpt["config"],
        "task": {k: v for k, v in ckpt["task"].items() if k not in ("vocab", "target_vocab")},
        "metrics": metrics,
        "floor": floor,
        "quick": quick,
        "train": ckpt["train"],
        "seconds": time.perf_counter() - t0,
        "extra": extra,
    }
    _write_result(out, result)
    verdict = {True: "floor met", False: "FLOOR MISSED", None: "no floor"}[floor["met"]]
    progress(
        f"{_metrics_line(metrics)} {verdict if not quick else '(quick)'}; "
        f"{'FAILED' if entry.name in failed else 'built'} in {_secs(result['seconds'])}"
    )
    return result


def _others(out: Path, entry: Entry, done: dict[str, dict], quick: bool) -> dict[str, dict]:
    others = {
        n: done.get(n) or _previous_metrics(out, n, quick) for n in REGISTRY if n != entry.name
    }
    return {n: m for n, m in others.items() if m is not None}


def _write_result(out: Path, result: dict[str, Any]) -> None:
    path = out / result["name"] / "metrics.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)
