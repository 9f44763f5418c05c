"""Building the zoo: train, run the hooks (export and verify), write metrics and the card.

``build_zoo`` trains every entry of the registry (``rnnzoo.models.zoo``; or ``only`` some),
writes ``OUT/NAME/model.pt`` and ``OUT/NAME/metrics.json`` per entry and the card
``OUT/ZOO.md`` with its pictures.

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

Floors are checked with ``zoo.check_floor``; quick builds report them but do not enforce them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from rnnzoo.errors import FailedPrecondition, RnnzooError
from rnnzoo.models import zoo
from rnnzoo.models.zoo import DEFAULT_OUT, Entry, check_floor

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
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Train the entries that are not up to date, run the hooks, write metrics and the card.

    ``force``: retrain and rerun the hooks even for entries that are up to date.
    ``jobs``: entries built at once, each in its own process with ``threads`` torch threads
    (the hooks must then be module-level functions, and progress lines go to stdout).
    Raises ``FailedPrecondition`` naming every entry whose hook failed, and (full builds only)
    every entry that missed its floor; the card is written first.
    """

    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = zoo.select(only)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)  # for the hooks and the card too (see train_entry)
    try:
        return _build(out, entries, quick, list(after_train), progress, threads, log, force, jobs)
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
    jobs: int = 1,
) -> list[dict[str, Any]]:
    from rnnzoo.models.card import write_card
    from rnnzoo.models.checkpoint import save_checkpoint

    results: list[dict[str, Any]] = []
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}  # entry -> what its hook said
    counts = {"trained": 0, "up to date": 0, "rerun hooks": 0}
    t_all = time.perf_counter()
    n = len(entries)
    if jobs > 1 and n > 1:
        results = _build_in_processes(
            out, entries, quick, hooks, threads, force, jobs, done, failed, counts
        )
    else:
        for i, entry in enumerate(entries, 1):
            prefix = f"[{i}/{n}] {entry.name}: "

            def progress(msg: str, prefix: str = prefix) -> None:
                log(prefix + msg)

            token = _PROGRESS.set(progress)
            try:
                result = _build_entry(
                    out,
                    entry,
                    quick,
                    hooks,
                    progress_bar,
                    threads,
                    force,
                    done,
                    failed,
                    counts,
                    save_checkpoint,
                )
            finally:
                _PROGRESS.reset(token)
            if result is not None:
                results.append(result)
    total = time.perf_counter() - t_all
    # The card covers every entry built into OUT, not only this run's (`rnnzoo train NAME`
    # into a built zoo updates one row).
    built = {r["name"]: r for r in results}
    found = [built.get(n) or _previous_result(out, n) for n in zoo.REGISTRY]
    rows = [r for r in found if r is not None]
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


def _entry_in_process(
    out: Path, name: str, label: str, quick: bool, hooks: list[Hook], threads: int, force: bool
) -> tuple[dict[str, Any] | None, str | None, dict[str, int]]:
    """One entry in a worker process: (its row, its hook's failure, what was done)."""
    import torch

    from rnnzoo.models.checkpoint import save_checkpoint

    torch.set_num_threads(threads)
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    counts = {"trained": 0, "up to date": 0, "rerun hooks": 0}
    token = _PROGRESS.set(lambda msg: print(label + msg, flush=True))
    try:
        result = _build_entry(
            out,
            zoo.get_entry(name),
            quick,
            hooks,
            False,
            threads,
            force,
            done,
            failed,
            counts,
            save_checkpoint,
        )
    finally:
        _PROGRESS.reset(token)
    return result, failed.get(name), counts


def _build_in_processes(
    out: Path,
    entries: list[Entry],
    quick: bool,
    hooks: list[Hook],
    threads: int,
    force: bool,
    jobs: int,
    done: dict[str, dict],
    failed: dict[str, str],
    counts: dict[str, int],
) -> list[dict[str, Any]]:
    """Build entries ``jobs`` at a time, one process each (training is single-threaded: two
    processes on two cores take ~half the time of one, where two torch threads in one process
    were ~50x slower). Floors that compare entries are settled once all are built."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = len(entries)
    ctx = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state in the workers
    with ProcessPoolExecutor(max_workers=min(jobs, n), mp_context=ctx) as pool:
        futures = [
            pool.submit(
                _entry_in_process,
                out,
                e.name,
                f"[{i}/{n}] {e.name}: ",
                quick,
                hooks,
                threads,
                force,
            )
            for i, e in enumerate(entries, 1)
        ]
        outcomes = [f.result() for f in futures]
    results = []
    for entry, (result, failure, did) in zip(entries, outcomes, strict=True):
        for k, v in did.items():
            counts[k] += v
        if failure is not None:
            failed[entry.name] = failure
        if result is not None:
            done[entry.name] = result["metrics"]
            results.append(result)
    for result in results:  # a floor like "beats tag-gru" needs every entry's metrics
        entry = zoo.get_entry(result["name"])
        result["floor"] = check_floor(entry, result["metrics"], _others(out, entry, done, quick))
        _write_result(out, result)
    return results


def _others(out: Path, entry: Entry, done: dict[str, dict], quick: bool) -> dict[str, dict]:
    others = {
        n: done.get(n) or _previous_metrics(out, n, quick) for n in zoo.REGISTRY if n != entry.name
    }
    return {n: m for n, m in others.items() if m is not None}


def _write_result(out: Path, result: dict[str, Any]) -> None:
    path = out / result["name"] / "metrics.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)
