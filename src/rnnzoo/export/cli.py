"""``rnnzoo export`` and ``rnnzoo verify``.

``export_verified`` is the export path that never leaves an unverified file where a server
looks: it exports into ``DIR/.staging/`` (hidden folders are not scanned by ``rnnzoo serve``),
verifies the staged graphs against the checkpoint, writes the parity record
``DIR/NAME.parity.json`` (``rnnzoo.parity_record``) and only then moves the graphs into ``DIR``
(``os.replace``: atomic per file). When parity fails, the servable graphs of NAME in ``DIR``
are removed, the failing export stays quarantined in ``DIR/.staging/``, the record says
``ok: false`` with the summary, and ``FailedPrecondition`` says what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rnnzoo.errors import FailedPrecondition

STAGING = ".staging"


def _target(ckpt_path: Path, ckpt: dict[str, Any], out: str | Path | None) -> tuple[str, Path]:
    """(model name, the .onnx path to write): default NAME.onnx next to the checkpoint."""
    name = str(ckpt.get("name") or ckpt_path.parent.name)
    if out is None:
        out = ckpt_path.parent / f"{name}.onnx"
    out = Path(out)
    if out.suffix != ".onnx":  # a folder, existing or not
        out = out / f"{name}.onnx"
    return name, out


def export_checkpoint(ckpt_path: str | Path, out: str | Path | None = None) -> list[Path]:
    """Export a checkpoint (seq2seq: both halves); default next to it as NAME.onnx.

    Writes the servable file(s) directly, unverified: ``export_verified`` is the safe path.
    """
    from rnnzoo.export.onnx_export import export_model
    from rnnzoo.export.source import load
    from rnnzoo.parity_record import sha256_file

    ckpt_path = Path(ckpt_path)
    model, ckpt = load(ckpt_path)
    name, out = _target(ckpt_path, ckpt, out)
    return export_model(
        model,
        out,
        name=name,
        task=ckpt.get("task"),
        checkpoint=ckpt_path,
        checkpoint_sha256=sha256_file(ckpt_path),
    )


def _graph_names(name: str, onnx_name: str, family: str) -> list[str]:
    """The file names an export of NAME to ``onnx_name`` writes."""
    if family == "seq2seq":
        base = onnx_name.removesuffix(".onnx")
        return [f"{base}.encoder.onnx", f"{base}.decoder.onnx"]
    return [onnx_name]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_verified(
    ckpt_path: str | Path,
    out: str | Path | None = None,
    *,
    config_hash: str | None = None,
    log: Callable[[str], None] | None = None,
    verify_kw: dict[str, Any] | None = None,
) -> tuple[Any, list[Path]]:
    """Export, verify, record, then move into place: (parity report, servable files).

    ``log``: where the stage lines go (default: the zoo build's progress when inside a build,
    else stderr). Raises ``FailedPrecondition`` when parity fails (see the module docstring).
    """
    from rnnzoo import parity_record
    from rnnzoo.export.source import load
    from rnnzoo.export.verify import report_json, verify_file
    from rnnzoo.models.build import build_progress, stage

    say = log or build_progress() or _stderr
    ckpt_path = Path(ckpt_path)
    _, ckpt = load(ckpt_path)
    name, target = _target(ckpt_path, ckpt, out)
    folder = target.parent
    staging = folder / STAGING
    finals = [folder / f for f in _graph_names(name, target.name, ckpt["family"])]
    for f in finals:  # an earlier attempt's quarantined files
        (staging / f.name).unlink(missing_ok=True)
    record_path = parity_record.record_path(folder, name)
    with stage("export", say):
        staged = export_checkpoint(ckpt_path, staging / target.name)
    ckpt_sha = parity_record.sha256_file(ckpt_path)
    report = None
    with stage("verify", say) as st:
        try:
            report, _ = verify_file(staged[0], ckpt_path, **(verify_kw or {}))
            ok, summary = bool(report.ok), report.summary()
            details = json.loads(report_json(report))
        except Exception as exc:  # a verify that cannot finish judges nothing as passed
            ok, summary, details = False, f"verification did not finish: {exc}", None
            error: BaseException | None = exc
        else:
            error = None
        numbers = report.headline() if report is not None else ""
        if ok:
            record = parity_record.make_record(
                name,
                ok=True,
                summary=summary,
                files=staged,
                location=".",
                checkpoint_sha256=ckpt_sha,
                config_hash=config_hash,
                report=details,
            )
            # Record first, then the moves: a crash in between leaves files that do not match
            # the record, which the server refuses; never an unverified file it would serve.
            parity_record.write_record(record_path, record)
            for src, dst in zip(staged, finals, strict=True):
                os.replace(src, dst)
            _remove_if_empty(staging)
            st["result"] = f"ok ({numbers})" if numbers else "ok"
            return report, finals
        st["result"] = f"FAILED ({numbers})" if numbers else "FAILED"
        record = parity_record.make_record(
            name,
            ok=False,
            summary=summary,
            files=staged,
            location=STAGING,
            checkpoint_sha256=ckpt_sha,
            config_hash=config_hash,
            report=details,
        )
        parity_record.write_record(record_path, record)
        removed = [f for f in finals if f.exists()]
        for f in removed:
            f.unlink()
        message = (
            f"{name}: ONNX parity failed, so nothing of it is served: the failing export is "
            f"quarantined in {staging}/, {record_path} records ok=false"
            + (
                f", and the earlier servable {', '.join(f.name for f in removed)} was removed"
                if removed
                else ""
            )
            + f". To see why: `rnnzoo verify {staged[0]} --checkpoint {ckpt_path}`; a correct "
            "export that fails is a parity-rule bug (rnnzoo/export/verify.py), a wrong one an "
            f"exporter bug (rnnzoo/export/). Summary:\n{summary}"
        )
        raise FailedPrecondition(message) from error


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (another model's quarantine), or gone
        folder.rmdir()


def _cmd_export(args: argparse.Namespace) -> int:
    from rnnzoo import parity_record
    from rnnzoo.export.source import resolve_checkpoint

    ckpt = resolve_checkpoint(args.model)
    if args.no_verify:
        files = export_checkpoint(ckpt, args.out)
        # Whatever record lies beside them judged other bytes: the server would refuse these.
        # Unverified now, like a model exported elsewhere: no record at all.
        from rnnzoo.contract import read_contract

        c = read_contract(files[0])
        stale = parity_record.record_path(files[0].parent, c.group or c.name)
        if stale.exists():
            stale.unlink()
            _stderr(f"removed {stale}: it judged an earlier export (this one is unverified)")
    else:
        _, files = export_verified(ckpt, args.out, log=_stderr)
    for path in files:
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
        why = (
            f"{len(report.failures)} parity comparisons exceed their tolerance "
            f"(atol={args.atol} rtol={args.rtol}, plus the measured conditioning for sequences "
            "longer than 8 steps)"
            if report.failures
            else f"no fixed-tolerance case compared {', '.join(report.unjudged)}"
        )
        print(f"rnnzoo: error: {why}; see the FAIL lines above", file=sys.stderr)
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
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="write the .onnx without the parity check (by default it is verified in "
        f"{STAGING}/ first and written, with NAME.parity.json, only when parity holds)",
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

    from rnnzoo.export.module_cli import add_factory_routes  # imports no torch

    add_factory_routes(p, v)
