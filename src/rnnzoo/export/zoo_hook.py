"""The zoo build's export step: export, verify, benchmark; card columns out, or a failure.

``rnnzoo zoo build`` calls ``after_train(entry, ckpt_path, out_dir)`` once per entry that is
not up to date. It exports the checkpoint through ``export_verified`` (staged in
``out_dir/.staging/``, verified, the parity record ``NAME.parity.json`` written, then moved
into ``out_dir`` only when parity holds), measures the ORT/PyTorch speed ratios and returns
the card's columns. A parity failure raises ``FailedPrecondition``: the build names the
entry, and nothing of it is left for ``rnnzoo serve``.

``after_train.is_current(entry, ckpt_path, out_dir)`` tells the build whether the export is
still good: the parity record says ok, judged the checkpoint that is there now (its sha256)
built from the same config hash, and every graph it judged is in ``out_dir`` byte for byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _name(entry: Any, ckpt_path: Path) -> str:
    return getattr(entry, "name", None) or ckpt_path.parent.name


def _config_hash(ckpt_path: Path) -> str | None:
    from rnnzoo.models.checkpoint import read_checkpoint

    build = read_checkpoint(ckpt_path).get("build")
    return build.get("config_hash") if isinstance(build, dict) else None


def after_train(entry: Any, ckpt_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Export + verify + bench one zoo entry; returns card columns."""
    from rnnzoo.contract import read_contract
    from rnnzoo.export.bench import bench_net
    from rnnzoo.export.cli import export_verified
    from rnnzoo.export.source import load
    from rnnzoo.models.build import stage

    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    name = _name(entry, ckpt_path)
    report, files = export_verified(
        ckpt_path, out_dir / f"{name}.onnx", config_hash=_config_hash(ckpt_path)
    )
    model, _ = load(ckpt_path)
    speed: dict[str, Any] = {}
    with stage("bench"):
        for path in files:
            c = read_contract(path)
            net = getattr(model, c.role) if c.role in ("encoder", "decoder") else model
            for label, r in bench_net(net, path, contract=c).items():
                key = label if c.role == "model" else f"{c.role}_{label}"
                speed[key] = r
    stream = report.max_abs("stream")  # None: nothing streamable
    return {
        "onnx_files": [p.name for p in files],
        "parity_ok": True,
        "parity_max_abs": report.max_abs(),
        "parity_max_abs_fixed": report.max_abs(fixed_only=True),
        "parity_max_kappa": report.max_kappa(),
        "parity_max_abs_stream": "n/a (bidirectional)" if stream is None else stream,
        "parity_cases": len(report.cases),
        "parity_skipped": list(report.skipped),
        "parity_seconds": round(report.seconds, 1),
        "ort_speedup_step_b1": {k: v["ratio"] for k, v in speed.items() if "step" in k},
        "ort_speedup_t1000_b1": {k: v["ratio"] for k, v in speed.items() if "seq1000" in k},
        "speed": speed,
    }


def is_current(entry: Any, ckpt_path: str | Path, out_dir: str | Path) -> bool:
    """The export in ``out_dir`` is verified, for this checkpoint and config, byte for byte."""
    from rnnzoo import parity_record

    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    name = _name(entry, ckpt_path)
    record = parity_record.read_record(parity_record.record_path(out_dir, name))
    if record is None or not record["ok"] or record.get("location") != ".":
        return False
    if not record["files"] or record.get("checkpoint_sha256") != parity_record.sha256_file(
        ckpt_path
    ):
        return False
    if record.get("config_hash") != _config_hash(ckpt_path):
        return False
    for fname, sha in record["files"].items():
        f = out_dir / fname
        if not f.is_file() or parity_record.sha256_file(f) != sha:
            return False
    return True


after_train.is_current = is_current  # type: ignore[attr-defined]
