"""The zoo card: ``OUT/ZOO.md`` and the PNG pictures it shows.

One short table row per model (model, task, cell, metric, value, baseline, floor, parity);
the details (hyperparameters, parity numbers and skipped cases, speed ratios, other hook
columns) are bullets under each model in its group's section.

Pictures: forecasts vs truth, training curves per group, and the long-range gradient story
(gradient norm w.r.t. early inputs over training, pre-clip gradient norms, clip rate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

GROUP_TITLES = {
    "forecast": "Forecasting a noisy signal",
    "lm": "Character language models (Python source)",
    "longrange": "Long-range memory: the adding problem, same budget for every cell",
    "tagging": "Per-character tagging of Python source",
    "seq2seq": "Sequence to sequence",
}
TINY = 1e-30  # where exact zeros are drawn on log axes


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _floor_cell(r: dict[str, Any]) -> str:
    """✔/✘ and the floor in brief; details (the floor's full text) go below the table."""
    if r["quick"]:
        return "not claimed (quick)"
    floor = r["entry"].get("floor") or {}
    if "max_ratio" in floor:
        short = f"≤ {floor['max_ratio']}× baseline"
    elif "min_value" in floor:
        short = f"≥ {floor['min_value']}"
    elif "beats" in floor:
        short = f"beats {floor['beats']}"
    else:
        return "— (none)"
    met = r["floor"]["met"]
    return {True: f"✔ {short}", False: f"✘ **missed** {short}", None: f"? {short}"}[met]


def _probe_note(train: dict[str, Any]) -> str:
    """The last gradient probe, in words: how much gradient reaches the early inputs."""
    probes = train.get("probes") or []
    if not probes:
        return ""
    last = probes[-1]
    ratio = last["grad_early"] / last["grad_late"] if last["grad_late"] else 0.0
    return (
        f" At step {last['step']}: |dL/dx| on the first tenth {last['grad_early']:.2e}, "
        f"{ratio:.1e} x that on the last tenth."
    )


def _parity_cell(r: dict[str, Any]) -> str:
    ok = r["extra"].get("parity_ok")
    if ok is None:
        return "—" if "onnx_files" not in r["extra"] else "✔"
    return "✔" if ok else "✘ **failed**"


def _cell_name(r: dict[str, Any]) -> str:
    cfg = r["config"]
    if r["family"] == "seq2seq":
        return f"{cfg['cell']} enc-dec"
    layers = f"{cfg['num_layers']}-layer " if cfg["num_layers"] > 1 else ""
    return layers + ("bi-" if cfg["bidirectional"] else "") + cfg["cell"]


def _table(results: list[dict[str, Any]]) -> list[str]:
    """The main table: a few columns; everything else is in the per-model details."""
    head = ["model", "task", "cell", "metric", "value", "baseline", "floor", "parity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r["metrics"]
        row = [
            f"[`{r['name']}`](#{r['name']})",
            r["task"]["name"],
            _cell_name(r),
            m["metric"],
            _fmt(m["value"]),
            f"{_fmt(m['baseline'])} ({m['baseline_name']})",
            _floor_cell(r),
            _parity_cell(r),
        ]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines


PARITY_KEYS = (
    "parity_ok",
    "parity_cases",
    "parity_max_abs",
    "parity_max_abs_fixed",
    "parity_max_kappa",
    "parity_max_abs_stream",
    "parity_seconds",
    "parity_skipped",
    "error",
)
SPEED_KEYS = (("ort_speedup_step_b1", "one step:"), ("ort_speedup_t1000_b1", "T=1000:"))
HIDDEN_KEYS = ("speed",)  # raw measurements: in metrics.json


def _details(r: dict[str, Any]) -> list[str]:
    """Sub-bullets under a model: architecture, floor, parity, speed, other hook columns."""
    cfg, m, t, extra = r["config"], r["metrics"], r["train"], r["extra"]
    if r["family"] == "seq2seq":
        layers, dirs = cfg["num_layers"], 1
    else:
        layers, dirs = cfg["num_layers"], 2 if cfg["bidirectional"] else 1
    out = [
        f"  - model: {_cell_name(r)}, hidden {cfg.get('hidden_size', '?')}, {layers} layer(s), "
        f"{dirs} direction(s), {m['parameters']:,} parameters; ratio to baseline "
        f"{_fmt(m['ratio'])}; floor: {r['floor']['text']}",
        f"  - training: {t['steps']} steps x batch {t['batch_size']}, lr {t['lr']}, clip "
        f"{t['clip']} (fired on {100 * t['clip_fraction']:.0f}% of steps), seed {t['seed']}, "
        f"{t['seconds']:.1f} s",
    ]
    if any(k in extra for k in PARITY_KEYS):
        ok = extra.get("parity_ok", True)
        parts = [("ok" if ok else "**FAILED**")]
        if extra.get("parity_cases") is not None:
            parts.append(f"{extra['parity_cases']} cases")
        if extra.get("parity_max_abs_fixed") is not None:
            parts.append(f"worst |ort − torch| {_fmt(extra['parity_max_abs_fixed'])} per step")
        if extra.get("parity_max_abs") is not None:
            parts.append(f"{_fmt(extra['parity_max_abs'])} over whole sequences")
        if extra.get("parity_max_kappa") is not None:
            parts.append(f"conditioning κ up to {_fmt(extra['parity_max_kappa'])}")
        if extra.get("parity_max_abs_stream") is not None:
            parts.append(f"streamed {_fmt(extra['parity_max_abs_stream'])}")
        if extra.get("parity_seconds") is not None:
            parts.append(f"{_fmt(extra['parity_seconds'])} s")
        if extra.get("error"):
            parts.append(str(extra["error"]))
        out.append(f"  - parity (`{r['name']}.parity.json`): " + ", ".join(parts))
        for skipped in extra.get("parity_skipped") or []:
            out.append(f"    - skipped: {skipped}")
    if extra.get("onnx_files"):
        out.append(f"  - ONNX: {_fmt(extra['onnx_files'])}")
    speed = [f"{label} {_fmt(extra[k])}" for k, label in SPEED_KEYS if extra.get(k)]
    if speed:
        out.append("  - ONNX Runtime speed-up over PyTorch, batch 1: " + "; ".join(speed))
    shown = {*PARITY_KEYS, *(k for k, _ in SPEED_KEYS), *HIDDEN_KEYS, "onnx_files"}
    for k, v in extra.items():
        if k not in shown:
            out.append(f"  - {k}: {_fmt(v)}")
    return out


def _plot_forecasts(out: Path, results: list[dict[str, Any]]) -> str | None:
    import matplotlib.pyplot as plt

    from rnnzoo.models.checkpoint import load_checkpoint
    from rnnzoo.models.tasks import make_task

    rows = [r for r in results if r["task"]["kind"] == "forecast"]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.6 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows, strict=True):
        model, ckpt = load_checkpoint(out / r["name"] / "model.pt")
        task = make_task(ckpt["task"]["name"], **ckpt["task"]["params"])
        series = task.eval_series[:1]  # (1, T+1)
        pred = task.predict(model, series)[0]  # (T,)
        t = range(1, series.shape[1])
        ax.plot(t, series[0, 1:].numpy(), label="truth", color="black", lw=1)
        ax.plot(t, pred.numpy(), label=f"{r['name']} (one step ahead)", lw=1)
        ax.plot(t, series[0, :-1].numpy(), label="naive last value", lw=0.8, ls=":")
        ax.axvspan(0, task.warmup, color="grey", alpha=0.15, label="warm-up (not scored)")
        ax.set_title(
            f"{r['name']}: MSE {r['metrics']['value']:.4f} vs naive {r['metrics']['baseline']:.4f}"
        )
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "forecast.png", dpi=90)
    plt.close(fig)
    return "forecast.png"


def _plot_curves(out: Path, results: list[dict[str, Any]]) -> str | None:
    import matplotlib.pyplot as plt

    groups = [g for g in GROUP_TITLES if any(r["entry"]["group"] == g for r in results)]
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        for r in results:
            if r["entry"]["group"] != g:
                continue
            curve = r["train"]["loss_curve"]
            ax.plot([p[0] for p in curve], [p[1] for p in curve], label=r["name"], lw=1)
        ax.set_yscale("log")
        ax.set_title(g, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)
    return "curves.png"


def _plot_gradients(out: Path, results: list[dict[str, Any]]) -> str | None:
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["train"].get("probes")]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for r in rows:
        probes = r["train"]["probes"]
        steps = [p["step"] for p in probes]
        # Exact zeros (a dead ReLU path) are drawn at TINY so they stay on the log axis.
        early = [max(p["grad_early"], TINY) for p in probes]
        axes[0].plot(steps, early, label=r["name"], lw=1)
        ratio = [
            max(p["grad_early"] / p["grad_late"], TINY) if p["grad_late"] else TINY for p in probes
        ]
        axes[1].plot(steps, ratio, label=r["name"], lw=1)
        g = r["train"]["grad_norm_curve"]
        axes[2].plot(
            [p[0] for p in g],
            [p[1] for p in g],
            label=f"{r['name']} (clipped {100 * r['train']['clip_fraction']:.0f}% of steps)",
            lw=1,
        )
    axes[0].set_title(f"|dL/dx| at the first 10% of steps (0 drawn at {TINY:g})", fontsize=9)
    axes[1].set_title("|dL/dx| early / late (1 = no vanishing)", fontsize=9)
    axes[2].set_title(f"pre-clip gradient norm (clip at {rows[0]['train']['clip']})", fontsize=9)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gradients.png", dpi=90)
    plt.close(fig)
    return "gradients.png"


def _samples(out: Path, results: list[dict[str, Any]]) -> list[str]:
    """A short generated sample per language model, and decodes for seq2seq, for the card."""
    from rnnzoo.models.checkpoint import load_checkpoint
    from rnnzoo.models.tasks import make_task
    from rnnzoo.models.tasks.charlm import sample

    lines: list[str] = []
    for r in results:
        kind = r["task"]["kind"]
        if kind not in ("lm", "seq2seq"):
            continue
        model, ckpt = load_checkpoint(out / r["name"] / "model.pt")
        if kind == "lm":
            text = sample(model, ckpt["task"]["vocab"], "def ", 160, temperature=0.7, seed=0)
            lines += [f"`{r['name']}`, prompt `def `, temperature 0.7, seed 0:", "```python"]
            lines += ["def " + text, "```", ""]
        else:
            task = make_task(ckpt["task"]["name"], **ckpt["task"]["params"])
            numbers = [7, 42, 90210, 123456]
            for n in numbers:
                [got] = task.translate(model, [n])
                lines.append(f"- `{r['name']}`: {n} -> {got}")
            lines.append("")
    return lines


def write_card(
    out: str | Path, results: list[dict[str, Any]], *, quick: bool, total_seconds: float
) -> Path:
    """Write ``OUT/ZOO.md`` and its pictures; returns the card's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    out = Path(out)
    pictures = [
        p
        for p in (
            _plot_forecasts(out, results),
            _plot_curves(out, results),
            _plot_gradients(out, results),
        )
        if p
    ]
    train_total = sum(r["train"]["seconds"] for r in results)
    lines = ["# rnnzoo model card", ""]
    if quick or any(r["quick"] for r in results):
        lines += [
            "**Quick build**: tiny models trained for a few steps (tests and CI). The floors are "
            "not claimed for rows marked quick; run `rnnzoo zoo build` for the real zoo.",
            "",
        ]
    lines += [
        f"{len(results)} models; training took {train_total:.0f} s in total "
        f"(build {total_seconds:.0f} s, including evaluation, hooks and this card).",
        "",
        *_table(results),
        "",
        "Losses (mse, bits/char): lower is better; accuracies: higher. floor: what a full build "
        "must reach (✔ met, ✘ missed); parity: ONNX Runtime equals PyTorch "
        "(`rnnzoo verify`). Each model's details follow in its section below.",
        "",
    ]
    for g, title in GROUP_TITLES.items():
        rows = [r for r in results if r["entry"]["group"] == g]
        if not rows:
            continue
        lines += [f"## {title}", ""]
        for r in rows:
            lines.append(
                f'- <a id="{r["name"]}"></a>`{r["name"]}`: {r["entry"]["notes"]}.'
                + _probe_note(r["train"])
            )
            lines += _details(r)
        if g == "longrange":
            lines += [
                "",
                "Every cell gets the same steps, batch, learning rate and clipping. The "
                "trivial predictor (always the mean) scores ratio 1; keeping only the "
                "second marked value scores ratio 0.5; solving the task needs the first "
                "value, ~90 steps back. See `gradients.png` for the gradient that reaches it.",
            ]
        if g == "lm" and rows[0]["task"].get("corpus"):
            c = rows[0]["task"]["corpus"]
            lines += [
                "",
                f"Corpus: {c['source']}, {c['files']} files, {c['chars']:,} chars, "
                f"sha256 `{c['sha256'][:16]}…`; last 5% held out.",
            ]
        lines.append("")
    samples = _samples(out, results)
    if samples:
        lines += ["## Samples", "", *samples]
    if pictures:
        lines += ["## Pictures", ""]
        lines += [f"![{p}]({p})" for p in pictures]
        lines.append("")
    path = out / "ZOO.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
