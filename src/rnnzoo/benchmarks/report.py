"""Results -> a text table, a markdown document and a plot. Numbers come only from ``result``."""

from __future__ import annotations

import re
from pathlib import Path

SYSTEMS = (("echo", "B echo"), ("naive", "C naive"), ("rnnzoo", "D rnnzoo"))
NOTES_BEGIN, NOTES_END = "<!-- notes: kept when regenerated -->", "<!-- /notes -->"


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "—" if v is None else format(v, spec)


def compute_table(result: dict) -> str:
    ort = {(r["batch"], r["steps"]): r for r in result["compute"]["ort"]}
    tch = {(r["batch"], r["steps"]): r for r in result["compute"]["torch"]}
    rows = ["| B | T | A: ORT steps/s | E: PyTorch steps/s | A/E |", "|---:|---:|---:|---:|---:|"]
    for (b, t), a in sorted(ort.items()):
        e = tch.get((b, t))
        ratio = a["steps_per_s"] / e["steps_per_s"] if e else None
        e_v = e["steps_per_s"] if e else None
        rows.append(f"| {b} | {t} | {a['steps_per_s']:.0f} | {_fmt(e_v)} | {_fmt(ratio, '.2f')} |")
    return "\n".join(rows)


def server_table(result: dict) -> str:
    s = result["servers"]
    rs = {(r["name"], r["sessions"], r["steps"]): r["value"] for r in result["ratios"]}
    head = ["sessions", "T"]
    for _, label in SYSTEMS:
        head += [f"{label} steps/s", "p50 ms", "p99 ms"]
    head += ["D/B", "D/C", "D/A"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for d in s["rnnzoo"]:
        n, t = d["sessions"], d["steps"]
        cells = [str(n), str(t)]
        for key, _ in SYSTEMS:
            c = next((c for c in s[key] if c["sessions"] == n and c["steps"] == t), None)
            cells += [
                _fmt(c and c["steps_per_s"]),
                _fmt(c and c["p50_ms"], ".2f"),
                _fmt(c and c["p99_ms"], ".2f"),
            ]
        cells += [_fmt(rs.get((k, n, t)), ".2f") for k in ("D/B", "D/C", "D/A")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cpu_table(result: dict) -> str:
    """Server and client CPU per message: where the shared cores went in each cell."""
    s = result["servers"]
    head = (
        ["sessions", "T"]
        + [f"{label} server" for _, label in SYSTEMS]
        + [f"{label} client" for _, label in SYSTEMS]
    )
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for d in s["rnnzoo"]:
        n, t = d["sessions"], d["steps"]
        cells = [
            next((c for c in s[k] if c["sessions"] == n and c["steps"] == t), None)
            for k, _ in SYSTEMS
        ]
        vals = [_fmt(c and c["server_cpu_us_per_msg"]) for c in cells]
        vals += [_fmt(c and c["client_cpu_us_per_msg"]) for c in cells]
        rows.append(f"| {n} | {t} | " + " | ".join(vals) + " |")
    return "\n".join(rows)


def one_session_bound(result: dict) -> str | None:
    """What 1 session at T=1 can reach at best (``harness.one_session_bound``), in words."""
    from .harness import one_session_bound as bound_of

    got = bound_of(result)
    if got is None:
        return None
    bound, rtt_us, ort_us = got
    cold = result["cold_call"]
    return (
        f"At 1 session and 1 step/message a server adds at least one B=1 ORT call to the echo "
        f"round trip ({rtt_us:.0f} µs mean). Measured in this run, that call takes "
        f"{ort_us:.0f} µs (median) when the process idled {cold['gap_us']:.0f} µs before it, "
        f"as a server does between a lone client's messages. In a hot loop it takes "
        f"{cold['hot_us']:.0f} µs. So D/B ≤ {bound:.2f} with zero "
        f"Python overhead (≤ {rtt_us / (rtt_us + cold['hot_us']):.2f} with a hot cache)."
    ) + _minimal_floor(result)


def _minimal_floor(result: dict) -> str:
    """The minimal server's figures (M/B, D/M), when it ran."""
    rs = {(r["name"], r["sessions"], r["steps"]): r for r in result["ratios"]}
    mb, dm = rs.get(("M/B", 1, 1)), rs.get(("D/M", 1, 1))
    if mb is None or dm is None:
        return ""
    return (
        f" A minimal Python server that only decodes, runs that ORT call and encodes "
        f"(src/rnnzoo/benchmarks/minimal_server.py) reached M/B = {mb['value']:.2f} in this run: the floor "
        f"of a grpc.aio server running ORT per message here; rnnzoo reached D/M = "
        f"{dm['value']:.2f} of it."
    )


def step_many_table(result: dict) -> str:
    """StepMany (S) beside per-session Streams (D) at the same sessions, 1 step per chunk:
    session-steps/s, latency of a message, server and client CPU per session-step."""
    s = result["servers"]
    rs = {(r["name"], r["sessions"], r["steps"]): r["value"] for r in result["ratios"]}
    rows = [
        "| sessions | D Streams steps/s | S StepMany steps/s | S/D | D p99 ms | S p99 ms "
        "| D server CPU/step µs | S server CPU/step µs | D client | S client |",
        "|" + "---:|" * 10,
    ]
    for m in s.get("stepmany", []):
        n, t = m["sessions"], m["steps"]
        d = next((c for c in s["rnnzoo"] if c["sessions"] == n and c["steps"] == t), None)
        if d is None:
            continue
        cpu = [_fmt(x and x / t) for x in (d["server_cpu_us_per_msg"], m["server_cpu_us_per_msg"])]
        client = [_fmt(d["client_cpu_us_per_msg"] / t), _fmt(m["client_cpu_us_per_msg"] / t)]
        rows.append(
            f"| {n} | {d['steps_per_s']:.0f} | {m['steps_per_s']:.0f} | "
            f"{_fmt(rs.get(('S/D', n, t)), '.2f')} | {d['p99_ms']:.2f} | {m['p99_ms']:.2f} | "
            + " | ".join(cpu + client)
            + " |"
        )
    return "\n".join(rows)


def options_table(result: dict) -> str:
    """Steps/s per ORT option set and batch (T=1), idle machine vs one core taken."""
    rows_in = result.get("ort_options") or []
    batches = sorted({r["batch"] for r in rows_in})
    head = (
        "| ORT session options | "
        + " | ".join(f"B={b} idle | B={b}, 1 core busy" for b in batches)
        + " |"
    )
    rows = [head, "|---|" + "---:|" * (2 * len(batches))]
    for name in dict.fromkeys(r["options"] for r in rows_in):
        vals = []
        for b in batches:
            for busy in (False, True):
                r = next(
                    x
                    for x in rows_in
                    if x["options"] == name and x["batch"] == b and x["busy_core"] == busy
                )
                vals.append(f"{r['steps_per_s']:.0f}")
        rows.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(rows)


def delay_table(result: dict) -> str:
    rows = [
        "| max_delay_ms | sessions | T | steps/s | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for sw in result["delay_sweep"]:
        for c in sw["cells"]:
            rows.append(
                f"| {sw['max_delay_ms']:g} | {c['sessions']} | {c['steps']} | "
                f"{c['steps_per_s']:.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} |"
            )
    return "\n".join(rows)


def target_table(result: dict) -> str:
    rows = ["| target | measured (ratio of medians) | each round | met |", "|---|---:|---|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "not run"}[t["met"]]
        unit = " ms" if t["target"].startswith("p99") else ""
        each = ", ".join(f"{v:.2f}" for v in t.get("per_round") or []) or "—"
        rows.append(f"| {t['target']} | {_fmt(t['measured'], '.2f')}{unit} | {each} | {met} |")
    return "\n".join(rows)


def text(result: dict) -> str:
    """Plain-text summary for the terminal (markdown tables read fine there too)."""
    m = result["machine"]
    return "\n\n".join(
        [
            f"machine: {m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}, "
            f"torch {m['torch']}, grpcio {m['grpcio']}; load {m['loadavg_at_start']}",
            "compute limits (A: ORT loop, E: PyTorch eager; steps/s = B*T*calls/s)\n"
            + compute_table(result),
            "servers (closed loop, one Stream per session; T = steps per message)\n"
            + server_table(result),
            "queue delay trade-off (D)\n" + delay_table(result),
            "StepMany (S) vs per-session Streams (D), 1 step per chunk\n" + step_many_table(result),
            "server/client CPU per message (µs)\n" + cpu_table(result),
            "ORT session options (A, T=1, steps/s)\n" + options_table(result),
            "targets\n" + target_table(result) + "\n" + (one_session_bound(result) or ""),
        ]
    )


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["config"]["steps"]
    sessions = result["config"]["sessions"]
    ort = result["compute"]["ort"]
    ref_b = max(r["batch"] for r in ort)
    fig, axes = plt.subplots(1, len(steps) + 1, figsize=(4.2 * (len(steps) + 1), 3.8))
    for ax, t in zip(axes, steps, strict=False):
        for key, label in SYSTEMS:
            cells = sorted(
                (c for c in result["servers"][key] if c["steps"] == t), key=lambda c: c["sessions"]
            )
            ax.plot(
                [c["sessions"] for c in cells],
                [c["steps_per_s"] for c in cells],
                marker="o",
                label=label,
            )
        for r in ort:
            if r["steps"] == t and r["batch"] in (1, ref_b):
                ax.axhline(
                    r["steps_per_s"], ls="--", lw=1, color="gray" if r["batch"] == 1 else "k"
                )
                ax.annotate(
                    f"A: ORT B={r['batch']}",
                    (sessions[0], r["steps_per_s"]),
                    fontsize=7,
                    va="bottom",
                )
        for r in result["compute"]["torch"]:
            if r["steps"] == t and r["batch"] == 1:
                ax.axhline(r["steps_per_s"], ls=":", lw=1, color="tab:red")
                ax.annotate("E: torch B=1", (sessions[0], r["steps_per_s"]), fontsize=7, va="top")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sessions, [str(n) for n in sessions])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_title(f"{t} step(s) per message")
        ax.set_xlabel("concurrent sessions")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("steps/s (all sessions)")
    axes[0].legend(fontsize=8, loc="center right")
    # queue-delay trade-off: p99 latency vs throughput, one line per T, one point per delay
    ax = axes[-1]
    for t in steps:
        pts = [
            (sw["max_delay_ms"], c)
            for sw in result["delay_sweep"]
            for c in sw["cells"]
            if c["steps"] == t
        ]
        ax.plot(
            [c["p99_ms"] for _, c in pts],
            [c["steps_per_s"] for _, c in pts],
            marker="o",
            label=f"T={t}",
        )
        for d, c in pts:
            ax.annotate(f"{d:g} ms", (c["p99_ms"], c["steps_per_s"]), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("p99 latency (ms)")
    ax.set_title(f"D: --max-delay-ms at {result['config']['delay_sessions']} sessions")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: dict, plot_name: str, notes: str) -> str:
    m, c, mod = result["machine"], result["config"], result["model"]
    return f"""# rnnzoo benchmarks

Generated by `python -m rnnzoo.benchmarks --doc docs/benchmarks.md` (the tables and the plot;
the notes section is kept across runs). Raw numbers: `--json`.

## What is measured
One run, one machine, the same rnnzoo.v1 proto, payload and concurrency for every server:

- **A** bare ONNX Runtime step loop (the compute limit): the exported graph, the server's ORT
  session options (1 intra-op + 1 inter-op thread, sequential, no spinning), state fed back
  call after call; steps/s = B × T × calls/s, best of {c["compute_repeats"]} runs of {c["compute_s"]} s,
  measured before and after the servers (the better of the two counts; both are in the JSON).
- **B** echo server (the transport limit): same proto and `Stream` RPC, grpc.aio, answers
  every chunk with a `y` tensor of the size the model returns, does no inference.
- **C** naive server: `rnnzoo serve --max-batch 1` — one ORT call per message, no batching
  (the same server code as D, so D/C isolates batching).
- **D** `rnnzoo serve --max-batch {c["max_batch"]} --max-delay-ms {c["delays_ms"][0]:g}`
  (batching across sessions), plus a `--max-delay-ms` sweep at {c["delay_sessions"]} sessions.
- **E** PyTorch eager step loop (`net(x, state)` under `no_grad`, 1 thread), same weights.
- **M** minimal server, at 1 session and 1 step/message only (the lean path's floor): echo's
  grpc.aio setup plus, per message, a decode, one direct ORT call (the state in a dict) and an
  encode, and nothing else (`src/rnnzoo/benchmarks/minimal_server.py`).

Model: {mod["layers"]}-layer LSTM, H={mod["hidden"]}, input {mod["input"]}, output {mod["output"]}
(random weights, a real `rnnzoo.export` ONNX file of {mod["onnx_bytes"]} bytes).
Load: closed loop, one `Stream` per session, each session sends its next chunk only after
the previous answer; sessions in {list(c["sessions"])}, T (steps per message) in
{list(c["steps"])}. Each cell is measured in {c.get("rounds", 1)} rounds of {c["warmup_s"]} s warm-up + {c["duration_s"]} s
measured per server; every round runs B, C and D (and the delay sweep) back to back, and the
order rotates from round to round. A cell reports the median round, and a ratio is the ratio of
medians. The targets table also lists the ratio within each round.
Latency = per-message round trip seen by the client. Every server runs as a separate process
(`rnnzoo serve --port 0`, target read from its `listening on` line); the client is one asyncio
process with grpc.aio. All servers are up at once, and an idle one costs nothing.

**Machine**: {m["cpu"]}, {m["cores"]} cores (usable: {m["cores_usable"]}), Python {m["python"]},
onnxruntime {m["onnxruntime"]}, torch {m["torch"]}, grpcio {m["grpcio"]}, protobuf
{m["protobuf"]}, numpy {m["numpy"]}. Load average at start {m["loadavg_at_start"]}, at end
{m["loadavg_at_end"]}. **Client and server share these {m["cores"]} cores**: every server
number includes the cost of the Python client on the same CPU, so absolute figures are
lower bounds of what a server gets with its own cores; the ratios compare like with like.
Run took {result["elapsed_s"]} s.

## Targets
{target_table(result)}

{one_session_bound(result) or ""}

## Compute limits (A vs E)
{compute_table(result)}

## Servers
steps/s summed over all sessions; D/A uses A at B={max(r["batch"] for r in result["compute"]["ort"])}
with the same T.

{server_table(result)}

![throughput vs sessions]({plot_name})

CPU time per message (µs, user+sys from /proc, whole process incl. all threads, in the
measured window): what each server and the client spent on one round trip.

{cpu_table(result)}

## StepMany (S) vs per-session Streams (D)
The same server (D) stepped two ways at the same number of sessions, 1 step per chunk, in the
same rounds: one Stream per session (D), or one StepMany call whose every message carries a
chunk for each session (S). Steps/s count session-steps; p99 is a message's round trip (for S,
all sessions' steps at once); CPU is per session-step.

{step_many_table(result)}

## ORT session options (A, T=1, steps/s)
The server's choice against the alternatives, measured in this run. The "1 core busy" columns
were taken while another process kept one core busy, as the event loop and the clients do in a
server.

{options_table(result)}

## Queue-delay trade-off (D at {c["delay_sessions"]} sessions)
{delay_table(result)}

## Notes
{NOTES_BEGIN}
{notes.strip()}
{NOTES_END}
"""


def write_doc(result: dict, doc: Path) -> tuple[Path, Path]:
    """Write ``doc`` and its plot (``doc`` stem + .png), keeping an existing notes section."""
    notes = "(no notes yet)"
    if doc.exists():
        found = re.search(
            re.escape(NOTES_BEGIN) + r"\n(.*?)\n" + re.escape(NOTES_END),
            doc.read_text(encoding="utf-8"),
            re.S,
        )
        if found:
            notes = found.group(1)
    doc.parent.mkdir(parents=True, exist_ok=True)
    png = doc.with_suffix(".png")
    plot(result, png)
    doc.write_text(markdown(result, png.name, notes), encoding="utf-8")
    return doc, png
