"""``rnnzoo zoo list``, ``rnnzoo train NAME``, ``rnnzoo zoo build``.

``zoo build`` runs the export step after each entry unless ``--no-export``: the top-level
CLI (``rnnzoo.cli``) passes it in as ``args.export_hook`` (``rnnzoo.export.zoo_hook``), so
the models package never imports the export package (which imports models). It is resumable: entries that are up to
date (same config hash, export verified) are not redone unless ``--force``. ``train`` always
retrains its entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rnnzoo.errors import FailedPrecondition


def _export_hooks(args: argparse.Namespace) -> list[Any]:
    if args.no_export:
        return []
    load = getattr(args, "export_hook", None)  # set by rnnzoo.cli
    if load is None:
        raise FailedPrecondition(
            "the export step is not wired in (run `rnnzoo zoo build` from the rnnzoo command); "
            "pass --no-export to only train"
        )
    return [load()]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_list(args: argparse.Namespace) -> int:
    from rnnzoo.models.zoo import ENTRIES

    if args.json:
        print(json.dumps([e.to_dict() for e in ENTRIES], indent=1))
        return 0
    width = max(len(e.name) for e in ENTRIES)
    for e in ENTRIES:
        m = e.model
        shape = f"{m['cell']} H={m['hidden_size']} L={m.get('num_layers', 1)}"
        shape += " bidirectional" if m.get("bidirectional") else ""
        print(f"{e.name:<{width}}  {e.task:<10} {shape:<28} {e.notes}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rnnzoo.models.build import build_zoo
    from rnnzoo.models.zoo import DEFAULT_OUT

    build_zoo(
        args.out or DEFAULT_OUT,
        only=[args.name],
        quick=args.quick,
        after_train=[],
        progress=False if args.no_progress else None,
        threads=args.threads,
        log=_log,
        force=True,  # asked for by name: train it even when up to date
    )
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from rnnzoo.cores import usable_cores
    from rnnzoo.models.build import build_zoo
    from rnnzoo.models.zoo import DEFAULT_OUT, select

    select(args.only)  # unknown names fail before anything trains
    build_zoo(
        args.out or DEFAULT_OUT,
        only=args.only,
        quick=args.quick,
        after_train=_export_hooks(args),
        progress=False if args.no_progress else None,
        threads=args.threads,
        log=_log,
        force=args.force,
        jobs=args.jobs if args.jobs > 0 else usable_cores(),
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser("zoo", help="list or build the model zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)

    p = zsub.add_parser("list", help="list the zoo's entries")
    p.add_argument("--json", action="store_true", help="machine-readable entries")
    p.set_defaults(func=cmd_list)

    p = zsub.add_parser("build", help="train (and export) every entry; write OUT/ZOO.md")
    p.add_argument("--out", help="output folder (default: zoo)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="build only these entries")
    p.add_argument("--quick", action="store_true", help="tiny models for tests (floors unclaimed)")
    p.add_argument("--no-export", action="store_true", help="train only, skip ONNX export")
    p.add_argument("--force", action="store_true", help="rebuild entries that are up to date too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest here)")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="entries built at once, one process each (default 0: one per usable core)",
    )
    p.set_defaults(func=cmd_build)

    p = subparsers.add_parser("train", help="train one zoo entry into OUT/NAME/model.pt")
    p.add_argument("name", help="zoo entry name (see `rnnzoo zoo list`)")
    p.add_argument("--out", help="output folder (default: zoo)")
    p.add_argument("--quick", action="store_true", help="a tiny version (floors unclaimed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest here)")
    p.set_defaults(func=cmd_train)
