"""The zoo build's export step: export, verify, benchmark; card columns out, or a failure.

``rnnzoo zoo build`` calls ``after_train(entry, ckpt_path, out_dir)`` once per trained
entry. It exports the checkpoint into ``out_dir`` (seq2seq: both halves), runs the full
parity check (``verify_file``), measures the ORT/PyTorch speed ratios, writes the parity
report as ``NAME.parity.json`` beside the graphs and returns the columns for the model
card. A parity failure raises ``FailedPrecondition`` listing every failing case, so the
build fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rnnzoo.errors import FailedPrecondition


def after_train(entry: Any, ckpt_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Export + verify + bench one zoo entry; returns card columns."""
    from rnnzoo.contract import read_contract
    from rnnzoo.export.bench import bench_net
    from rnnzoo.export.cli import export_checkpoint
    from rnnzoo.export.source import load
    from rnnzoo.export.verify import report_json, verify_file

    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    name = getattr(entry, "name", None) or ckpt_path.parent.name
    files = export_checkpoint(ckpt_path, out_dir / f"{name}.onnx")
    report, _ = verify_file(files[0], ckpt_path)
    (out_dir / f"{name}.parity.json").write_text(report_json(report), encoding="utf-8")
    if not report.ok:
        raise FailedPrecondition(f"{name}: ONNX parity failed:\n{report.summary()}")
    model, _ = load(ckpt_path)
    speed: dict[str, Any] = {}
    for path in files:
        c = read_contract(path)
        net = getattr(model, c.role) if c.role in ("encoder", "decoder") else model
        for label, r in bench_net(net, path, contract=c).items():
            key = label if c.role == "model" else f"{c.role}_{label}"
            speed[key] = r
    stream = report.max_abs("stream")  # None: no streamable graph (bidirectional)
    return {
        "onnx_files": [p.name for p in files],
        "parity_max_abs": report.max_abs(),
        "parity_max_abs_stream": "n/a (bidirectional)" if stream is None else stream,
        "parity_cases": len(report.cases),
        "parity_skipped": report.skipped,
        "parity_seconds": round(report.seconds, 1),
        "ort_speedup_step_b1": {k: v["ratio"] for k, v in speed.items() if "step" in k},
        "ort_speedup_t1000_b1": {k: v["ratio"] for k, v in speed.items() if "seq1000" in k},
        "speed": speed,
    }
