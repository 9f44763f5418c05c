"""One benchmark run: compute limits (A, E), then three servers (B echo, C naive, D rnnzoo)
under the same closed-loop load, then the ratios, all from numbers measured in this run.

Systems, side by side on one machine, same proto/payload/concurrency:
  A  bare ONNX Runtime step loop, B in ``batches`` (compute limit)
  B  echo server: same rnnzoo.v1 Stream RPC, same-size response, no inference (transport limit)
  C  naive server: ``rnnzoo serve --max-batch 1``: one ORT call per message, nothing batched
  D  ``rnnzoo serve`` with batching (``--max-batch 64``), plus a ``--max-delay-ms`` sweep
  E  PyTorch eager step loop, B in ``torch_batches``
  M  minimal server, at 1 session and 1 step/message only: decode, one ORT call, encode and
     nothing else (``minimal_server.py``): what any Python grpc.aio server reaches there
  S  D's server stepped through StepMany: one call, one message per round carrying a 1-step
     chunk for each of N sessions (``load_many.py``), at ``many_sessions``, side by side with
     D's per-session Streams at the same N (the ratio S/D; CPU per session-step for both)
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

from .load import run_cell
from .load_many import run_many_cell
from .model import NAME as MODEL
from .servers import echo_server, minimal_server, rnnzoo_server


@dataclass
class BenchConfig:
    sessions: tuple[int, ...] = (1, 16, 64, 256)
    steps: tuple[int, ...] = (1, 8, 32)  # steps per message (chunk length T)
    batches: tuple[int, ...] = (1, 8, 32, 64)  # (A) ORT loop batch sizes
    torch_batches: tuple[int, ...] = (1, 64)  # (E)
    max_batch: int = 64  # (D)
    delays_ms: tuple[float, ...] = (0.0, 1.0, 5.0)  # (D) at ``delay_sessions``; first = main D
    delay_sessions: int = 64
    many_sessions: tuple[int, ...] = (64, 256)  # (S), at 1 step per chunk; in ``sessions``
    warmup_s: float = 0.5
    duration_s: float = 1.5  # measured seconds per round
    # Each cell is measured in ``rounds`` rounds, the servers' order rotated every round; a
    # cell reports the median round. Drift on a shared machine then hits every server alike.
    rounds: int = 3
    compute_s: float = 0.5  # (A)/(E): seconds per timed run, best of ``compute_repeats``
    compute_repeats: int = 3
    hidden: int = 128
    layers: int = 2

    @classmethod
    def quick(cls) -> BenchConfig:
        """Seconds, not minutes: every system and ratio, at toy sizes (for the smoke test)."""
        return cls(
            sessions=(1, 4),
            steps=(1, 4),
            batches=(1, 4),
            torch_batches=(1, 4),
            max_batch=64,
            delays_ms=(0.0, 1.0),
            delay_sessions=4,
            many_sessions=(4,),
            warmup_s=0.1,
            duration_s=0.3,
            rounds=2,
            compute_s=0.05,
            compute_repeats=1,
            hidden=32,
            layers=1,
        )


def machine() -> dict:
    """Cores, CPU model and the versions that decide the numbers."""
    import grpc
    import numpy
    import onnxruntime
    import torch
    from google import protobuf

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": [round(v, 2) for v in load] if load else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "protobuf": protobuf.__version__,
        "numpy": numpy.__version__,
    }


def _measure(
    srv, model: str, cfg: BenchConfig, sessions: int, steps: int, log, many: bool = False
) -> dict:
    cell = run_many_cell if many else run_cell
    r = asyncio.run(
        cell(
            srv.target,
            model,
            sessions,
            steps,
            warmup_s=cfg.warmup_s,
            duration_s=cfg.duration_s,
            server_pid=srv.proc.pid,
        )
    )
    name = f"StepMany: {srv.name}" if many else srv.name
    unit = "session-step" if many else "msg"
    log(
        f"  {name:<40} sessions={sessions:<4} steps={steps:<3} "
        f"{r.steps_per_s:>10.0f} steps/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  "
        f"cpu/{unit} server {r.server_cpu_us_per_msg or float('nan'):6.0f} us "
        f"client {r.client_cpu_us_per_msg:6.0f} us"
    )
    # 1-minute load average after the cell: how busy the shared machine was meanwhile
    return {**r.as_dict(), "loadavg_1m": round(os.getloadavg()[0], 2)}


MEDIAN_KEYS = (
    "steps_per_s",
    "msgs_per_s",
    "p50_ms",
    "p99_ms",
    "server_cpu_us_per_msg",
    "client_cpu_us_per_msg",
)


def summarize(rounds: list[dict]) -> dict:
    """One cell from its rounds: the median of each figure, totals of counts, every round kept."""
    first = rounds[0]
    out = {"sessions": first["sessions"], "steps": first["steps"]}
    for k in MEDIAN_KEYS:
        vals = [r[k] for r in rounds if r[k] is not None]
        out[k] = statistics.median(vals) if vals else None
    out["messages"] = sum(r["messages"] for r in rounds)
    out["window_s"] = round(sum(r["window_s"] for r in rounds), 4)
    out["loadavg_1m"] = max(r["loadavg_1m"] for r in rounds)
    out["rounds"] = rounds
    return out


def _servers(model_dir: Path, cfg: BenchConfig, log) -> tuple[dict, list[dict]]:
    """Every server up at once (idle ones cost ~nothing). Each cell measures them back to back
    in ``cfg.rounds`` rounds, rotating who goes first, so load from elsewhere on a shared
    machine hits B, C and D alike and the ratios hold."""
    main = {
        "echo": echo_server("y", 1),
        "naive": rnnzoo_server(model_dir, 1, 0.0),
        "rnnzoo": rnnzoo_server(model_dir, cfg.max_batch, cfg.delays_ms[0]),
    }
    delayed = {d: rnnzoo_server(model_dir, cfg.max_batch, d) for d in cfg.delays_ms[1:]}
    minimal = minimal_server(model_dir / f"{MODEL}.onnx") if 1 in cfg.sessions else None
    procs = [*main.values(), *delayed.values(), *([minimal] if minimal else [])]
    servers: dict[str, list[dict]] = {k: [] for k in main}
    servers["minimal"] = []
    servers["stepmany"] = []  # S: D's server through StepMany (per-session-step CPU figures)
    sweep_cells: dict[float, list[dict]] = {d: [] for d in delayed}
    try:
        for p in procs:
            p.start()
        for sessions in cfg.sessions:
            for steps in cfg.steps:
                systems: list[tuple[object, object]] = list(main.items())
                if sessions == cfg.delay_sessions:
                    systems += list(delayed.items())
                if minimal is not None and sessions == 1 and steps == 1:
                    systems.append(("minimal", minimal))
                if steps == 1 and sessions in cfg.many_sessions:
                    systems.append(("stepmany", main["rnnzoo"]))
                rounds: dict[object, list[dict]] = {k: [] for k, _ in systems}
                for i in range(cfg.rounds):
                    first = i % len(systems)
                    for key, srv in systems[first:] + systems[:first]:
                        many = key == "stepmany"
                        rounds[key].append(_measure(srv, MODEL, cfg, sessions, steps, log, many))
                for key, cells in rounds.items():
                    dest = servers[key] if key in servers else sweep_cells[cast(float, key)]
                    dest.append(summarize(cells))
    finally:
        for p in procs:
            p.stop()
    sweep = [
        {
            "max_delay_ms": cfg.delays_ms[0],
            "cells": [c for c in servers["rnnzoo"] if c["sessions"] == cfg.delay_sessions],
        }
    ]
    sweep += [{"max_delay_ms": d, "cells": cells} for d, cells in sweep_cells.items()]
    return servers, sweep


def _compute_rows(m, cfg: BenchConfig, log) -> dict[str, list[dict]]:
    """(A) and (E) at every (B, T) of the config."""
    from .compute import ort_loop, torch_loop

    ort_rows = [
        ort_loop(m.onnx_path, b, t, seconds=cfg.compute_s, repeats=cfg.compute_repeats)
        for b in cfg.batches
        for t in cfg.steps
    ]
    for r in ort_rows:
        log(f"  A ort   B={r['batch']:<3} T={r['steps']:<3} {r['steps_per_s']:>10.0f} steps/s")
    torch_rows = [
        torch_loop(m.net, b, t, seconds=cfg.compute_s, repeats=cfg.compute_repeats)
        for b in cfg.torch_batches
        for t in cfg.steps
    ]
    for r in torch_rows:
        log(f"  E torch B={r['batch']:<3} T={r['steps']:<3} {r['steps_per_s']:>10.0f} steps/s")
    return {"ort": ort_rows, "torch": torch_rows}


def _cold_call(m, echo_rows: list[dict], cfg: BenchConfig, log) -> dict | None:
    """A B=1 T=1 ORT call after idling one echo round trip: what a lone session's step costs."""
    from .compute import ort_cold_call

    one = min(echo_rows, key=lambda r: (r["sessions"], r["steps"]))
    if one["steps"] != 1:
        return None
    calls = 300 if cfg.compute_s >= 0.5 else 30
    r = ort_cold_call(m.onnx_path, gap_s=1.0 / one["msgs_per_s"], calls=calls)
    log(
        f"  A ort   B=1 T=1 after {r['gap_us']:.0f} us idle: median {r['median_us']:.0f} us "
        f"(hot loop {r['hot_us']:.0f} us)"
    )
    return r


def _options_rows(m, cfg: BenchConfig, log) -> list[dict]:
    """ORT session options side by side: why the server runs 1 thread without spinning."""
    from .compute import ort_options_rows

    batches = (min(cfg.batches), max(cfg.batches))
    rows = ort_options_rows(
        m.onnx_path, batches, seconds=cfg.compute_s, repeats=cfg.compute_repeats
    )
    for r in rows:
        log(
            f"  A ort   {r['options']:<42} B={r['batch']:<3} busy core={r['busy_core']!s:<5} "
            f"{r['steps_per_s']:>10.0f} steps/s"
        )
    return rows


def run(cfg: BenchConfig, log=print, work_dir: Path | None = None) -> dict:
    """Run every system; return the result dict (see ``ratios`` for how ratios are made)."""
    from .model import build  # torch: imported only when a run starts

    t0 = time.time()
    result: dict = {"format": "rnnzoo.bench/1", "config": asdict(cfg), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="rnnzoo-bench-") as tmp:
        model_dir = Path(work_dir or tmp)
        m = build(model_dir, cfg.hidden, cfg.layers)
        result["model"] = {
            "name": m.name,
            "cell": "lstm",
            "hidden": cfg.hidden,
            "layers": cfg.layers,
            "input": "x (B, T, 1) float32",
            "output": "y (B, T, 1) float32",
            "onnx_bytes": m.onnx_path.stat().st_size,
        }
        log(f"model: {result['model']}")
        before = _compute_rows(m, cfg, log)
        result["servers"], result["delay_sweep"] = _servers(model_dir, cfg, log)
        after = _compute_rows(m, cfg, log)
        result["cold_call"] = _cold_call(m, result["servers"]["echo"], cfg, log)
        result["ort_options"] = _options_rows(m, cfg, log)
        # The compute limit is what the hardware gives at its best: per row, the better of the
        # runs before and after the servers (the raw runs are kept in compute_runs).
        result["compute_runs"] = [before, after]
        result["compute"] = {
            k: [
                max(a, b, key=lambda r: r["steps_per_s"])
                for a, b in zip(before[k], after[k], strict=True)
            ]
            for k in ("ort", "torch")
        }
    result["ratios"] = ratios(result)
    result["targets"] = targets(result)
    result["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["elapsed_s"] = round(time.time() - t0, 1)
    return result


# ---- ratios: only from the measured rows above ------------------------------------------------
def _cell(rows: list[dict], sessions: int, steps: int) -> dict | None:
    return next((r for r in rows if r["sessions"] == sessions and r["steps"] == steps), None)


def _compute(rows: list[dict], batch: int, steps: int) -> dict | None:
    return next((r for r in rows if r["batch"] == batch and r["steps"] == steps), None)


@dataclass
class Ratio:
    name: str  # e.g. "D/B"
    sessions: int | None
    steps: int
    batch: int | None
    numerator: float  # steps/s
    denominator: float  # steps/s
    value: float = field(init=False)
    # server vs server: the ratio within each round (both measured minutes apart at most)
    per_round: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.value = self.numerator / self.denominator


def ratios(result: dict) -> list[dict]:
    """D/B, D/C, D/A (A at the largest batch, same T) per cell; D/M and M/B where the minimal
    server ran (1 session, 1 step/message); A/E per (B, T) both measured."""
    s = result["servers"]
    ort, tch = result["compute"]["ort"], result["compute"]["torch"]
    ref_b = max(r["batch"] for r in ort)
    out: list[Ratio] = []
    for d in s["rnnzoo"]:
        n, t = d["sessions"], d["steps"]
        pairs = [
            ("D/B", _cell(s["echo"], n, t)),
            ("D/C", _cell(s["naive"], n, t)),
            ("D/M", _cell(s.get("minimal", []), n, t)),
        ]
        for name, other in pairs:
            if other:
                r = Ratio(name, n, t, None, d["steps_per_s"], other["steps_per_s"])
                r.per_round = [
                    a["steps_per_s"] / b["steps_per_s"]
                    for a, b in zip(d["rounds"], other["rounds"], strict=True)
                ]
                out.append(r)
        a = _compute(ort, ref_b, t)
        if a:
            out.append(Ratio("D/A", n, t, ref_b, d["steps_per_s"], a["steps_per_s"]))
    for m in s.get("stepmany", []):  # StepMany against per-session Streams, same sessions
        d = _cell(s["rnnzoo"], m["sessions"], m["steps"])
        if d is None:
            continue
        r = Ratio("S/D", m["sessions"], m["steps"], None, m["steps_per_s"], d["steps_per_s"])
        r.per_round = [
            a["steps_per_s"] / b["steps_per_s"]
            for a, b in zip(m["rounds"], d["rounds"], strict=True)
        ]
        out.append(r)
    for m in s.get("minimal", []):  # the floor itself against the transport limit
        b = _cell(s["echo"], m["sessions"], m["steps"])
        assert b is not None, "the echo server runs every cell the minimal server runs"
        r = Ratio("M/B", m["sessions"], m["steps"], None, m["steps_per_s"], b["steps_per_s"])
        r.per_round = [
            a["steps_per_s"] / e["steps_per_s"]
            for a, e in zip(m["rounds"], b["rounds"], strict=True)
        ]
        out.append(r)
    for e in tch:
        a = _compute(ort, e["batch"], e["steps"])
        if a:
            out.append(
                Ratio("A/E", None, e["steps"], e["batch"], a["steps_per_s"], e["steps_per_s"])
            )
    return [asdict(r) for r in out]


def _find(rs: list[dict], name: str, sessions: int | None, steps: int) -> dict | None:
    return next(
        (r for r in rs if r["name"] == name and r["sessions"] == sessions and r["steps"] == steps),
        None,
    )


def one_session_bound(result: dict) -> tuple[float, float, float] | None:
    """The best D/B one session at 1 step/message can reach in this run: echo's mean round
    trip plus one B=1 ORT call as it costs after idling that long, with zero Python
    overhead. Returns (bound, echo round trip µs, cold ORT call µs); None if not measured."""
    echo = _cell(result["servers"]["echo"], 1, 1)
    cold = result.get("cold_call")
    if echo is None or cold is None:
        return None
    rtt_us = 1e6 / echo["msgs_per_s"]
    return rtt_us / (rtt_us + cold["median_us"]), rtt_us, cold["median_us"]


def targets(result: dict) -> list[dict]:
    """The issues' targets, each with the measured value it was judged on (None: not run).
    The lean path's (1 session) is relative to ``one_session_bound`` of the same run."""
    rs = result["ratios"]
    big = 64 if 64 in result["config"]["sessions"] else max(result["config"]["sessions"])
    small = min(result["config"]["sessions"])
    tmax = max(result["config"]["steps"])
    measured = [
        n for n in result["config"].get("many_sessions", ()) if n in result["config"]["sessions"]
    ]
    most = max(measured) if measured else None
    bound = one_session_bound(result) if small == 1 else None
    lean = round(0.95 * bound[0], 3) if bound else None
    rows = [
        (
            f"D/B >= 0.95 x the one-session bound ({lean}), 1 step/message, 1 session"
            if lean
            else "D/B >= 0.95 x the one-session bound, 1 step/message, 1 session",
            _find(rs, "D/B", 1, 1) if lean else None,
            lean,
        ),
        (f"D/B >= 0.85, 1 step/message, {big} sessions", _find(rs, "D/B", big, 1), 0.85),
        (f"D/C >= 1.5, 1 step/message, {big} sessions", _find(rs, "D/C", big, 1), 1.5),
        (f"D/A >= 0.5, {tmax} steps/message, {big} sessions", _find(rs, "D/A", big, tmax), 0.5),
        (
            f"S/D >= 5 (StepMany vs per-session Streams), 1 step/chunk, {most} sessions",
            _find(rs, "S/D", most, 1) if most else None,
            5.0,
        ),
    ]
    out = []
    for label, r, want in rows:
        out.append(
            {
                "target": label,
                "want": want,
                "measured": None if r is None else r["value"],
                "per_round": [] if r is None else r["per_round"],
                "met": None if r is None else r["value"] >= want,
                "sessions": None if r is None else r["sessions"],
                "steps": None if r is None else r["steps"],
            }
        )
    d = _cell(result["servers"]["rnnzoo"], big, 1)
    out.append(
        {
            "target": f"p99 latency stated, {big} sessions, 1 step/message",
            "want": None,
            "measured": None if d is None else d["p99_ms"],
            "met": d is not None,
            "sessions": big,
            "steps": 1,
        }
    )
    return out
