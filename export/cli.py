"""``rnnzoo export`` and ``rnnzoo verify``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def export_checkpoint(ckpt_path: str | Path, out: str | Path | None = None) -> list[Path]:
    """Export a checkpoint (seq2seq: both halves); default next to it as NAME.onnx."""
    from rnnzoo.export.contract_builder import sha256_file
    from rnnzoo.export.onnx_export import export_model
    from rnnzoo.export.source import load

    ckpt_path = Path(ckpt_path)
    model, ckpt = load(ckpt_path)
    name = str(ckpt.get("name") or ckpt_path.parent.name)
    if out is None:
        out = ckpt_path.parent / f"{name}.onnx"
    out = Path(out)
    if out.suffix != ".onnx":  # a folder, existing or not
        out = out / f"{name}.onnx"
    return export_model(
        model,
        out,
        name=name,
        task=ckpt.get("task"),
        checkpoint=ckpt_path,
        checkpoint_sha256=sha256_file(ckpt_path),
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from rnnzoo.export.source import resolve_checkpoint

    for path in export_checkpoint(resolve_checkpoint(args.model), args.out):
        print(path)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from rnnzoo.export.verify import report_json, verify_file

    kw: dict[str, Any] = {"atol": args.atol, "rtol": args.rtol, "seed": args.seed}
    if args.quick:
        kw.update(times=(1, 2, 7, 64), batches=(1, 3), stream=(64, 3))
    report, files = verify_file(args.model, args.checkpoint, **kw)
    if args.json:
        print(report_json(report))
    else:
        print("verified " + ", ".join(str(f) for f in files))
        print(report.summary())
    if not report.ok:
        print(
            f"rnnzoo: error: {len(report.failures)} parity comparisons exceed "
            f"atol={args.atol} rtol={args.rtol}",
            file=sys.stderr,
        )
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained model to ONNX (symbolic batch/time, state I/O, contract)",
    )
    p.add_argument("model", metavar="NAME|CHECKPOINT", help="zoo entry name or path to model.pt")
    p.add_argument(
        "--out",
        help="output .onnx file or folder (seq2seq: FILE.encoder.onnx and FILE.decoder.onnx); "
        "default: NAME.onnx next to the checkpoint",
    )
    p.set_defaults(func=_cmd_export)

    v = subparsers.add_parser(
        "verify", help="check ONNX Runtime against PyTorch on random inputs and states"
    )
    v.add_argument("model", metavar="MODEL.onnx")
    v.add_argument(
        "--checkpoint", help="the checkpoint it came from (default: recorded in its contract)"
    )
    # Same defaults as rnnzoo.export.verify.ATOL/RTOL (not imported here: it loads torch).
    v.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    v.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance (default 1e-6)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--quick", action="store_true", help="T<=64 and B<=3 only")
    v.add_argument("--json", action="store_true", help="print the full report as JSON")
    v.set_defaults(func=_cmd_verify)
