"""The zoo card: ``OUT/ZOO.md`` (one table row per model) and the PNG pictures it shows.

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
SHOWN_EXTRAS = ("onnx_files", "ort_speedup_step_b1", "ort_speedup_t1000_b1")


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
    met = r["floor"]["met"]
    if r["quick"]:
        return f"not claimed (quick build); {r['floor']['text']}"
    return {True: "yes", False: "**NO**", None: "—"}[met] + f" ({r['floor']['text']})"


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


def _table(results: list[dict[str, Any]]) -> list[str]:
    extra_keys: list[str] = []  # scalar hook columns, plus a few small dicts/lists
    for r in results:
        for k, v in r["extra"].items():
            if k not in extra_keys and (not isinstance(v, dict | list) or k in SHOWN_EXTRAS):
                extra_keys.append(k)
    head = [
        "model", "task", "cell", "layers", "directions", "parameters", "metric", "value",
        "baseline", "ratio", "floor met?", "train s", *extra_keys,
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cfg, m = r["config"], r["metrics"]
        if r["family"] == "seq2seq":
            cell, layers, dirs = f"{cfg['cell']} enc-dec", cfg["num_layers"], 1
        else:
            cell, layers = cfg["cell"], cfg["num_layers"]
            dirs = 2 if cfg["bidirectional"] else 1
        row = [
            f"`{r['name']}`",
            r["task"]["name"],
            cell,
            layers,
            dirs,
            f"{m['parameters']:,}",
            m["metric"],
            _fmt(m["value"]),
            f"{_fmt(m['baseline'])} ({m['baseline_name']})",
            _fmt(m["ratio"]),
            _floor_cell(r),
            f"{r['train']['seconds']:.1f}",
            *[_fmt(r["extra"].get(k, "")) for k in extra_keys],
        ]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines


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
        "ratio = value / baseline. Losses (mse, bpc): lower is better; accuracies: higher.",
        "",
    ]
    for g, title in GROUP_TITLES.items():
        rows = [r for r in results if r["entry"]["group"] == g]
        if not rows:
            continue
        lines += [f"## {title}", ""]
        for r in rows:
            t = r["train"]
            lines.append(
                f"- `{r['name']}`: {r['entry']['notes']}. {t['steps']} steps x batch "
                f"{t['batch_size']}, lr {t['lr']}, clip {t['clip']} (fired on "
                f"{100 * t['clip_fraction']:.0f}% of steps), seed {t['seed']}." + _probe_note(t)
            )
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
            lines += ["", f"Corpus: {c['source']}, {c['files']} files, {c['chars']:,} chars, "
                      f"sha256 `{c['sha256'][:16]}…`; last 5% held out."]  # fmt: skip
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
