"""``python -m rnnzoo.benchmarks`` (and ``rnnzoo bench`` once registered): run, print, save."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rnnzoo.errors import InvalidArgument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="toy sizes, seconds (smoke test)")
    p.add_argument("--json", metavar="FILE", help="write the raw result as JSON ('-' = stdout)")
    p.add_argument("--doc", metavar="FILE.md", help="write the markdown report and FILE.png")
    p.add_argument("--duration", type=float, help="measured seconds per server per round")
    p.add_argument("--rounds", type=int, help="rounds per cell (server order rotates; median kept)")
    p.add_argument("--sessions", help="comma-separated session counts, e.g. 1,16,64,256")
    p.add_argument("--steps", help="comma-separated steps per message, e.g. 1,8,32")
    p.add_argument("--delays", help="comma-separated --max-delay-ms values for D, first = main")
    p.add_argument(
        "--isolation",
        action="store_true",
        help="instead: the isolation scenario (a light client vs a heavy one; "
        "benchmarks/isolation.py)",
    )
    p.add_argument("--scenarios", default="bidir,infer", help="--isolation: bidir and/or infer")
    p.add_argument("--nice", default="10", help="--isolation: --long-nice values to compare")
    p.add_argument(
        "--baseline", action="store_true", help="--isolation: also run with the long-job pool off"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the server vs echo, naive, ORT and PyTorch")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InvalidArgument(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise InvalidArgument(f"--{what} values must be >= 1, got {text!r}")
    return vals


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .harness import BenchConfig, run
    from .report import text, write_doc

    if args.isolation:
        from . import isolation

        args.duration = args.duration if args.duration is not None else 10.0
        return isolation.cmd(args)
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    if args.duration is not None:
        if args.duration <= 0:
            raise InvalidArgument(f"--duration must be > 0 seconds, got {args.duration}")
        cfg = replace(cfg, duration_s=args.duration)
    if args.rounds is not None:
        if args.rounds < 1:
            raise InvalidArgument(f"--rounds must be >= 1, got {args.rounds}")
        cfg = replace(cfg, rounds=args.rounds)
    if args.sessions:
        cfg = replace(cfg, sessions=_ints(args.sessions, "sessions"))
    if args.steps:
        cfg = replace(cfg, steps=_ints(args.steps, "steps"))
    if args.delays:
        try:
            delays = tuple(float(v) for v in args.delays.split(","))
        except ValueError:
            raise InvalidArgument(
                f"--delays takes comma-separated numbers, got {args.delays!r}"
            ) from None
        if not delays or min(delays) < 0:
            raise InvalidArgument(f"--delays values must be >= 0 ms, got {args.delays!r}")
        cfg = replace(cfg, delays_ms=delays)
    if cfg.delay_sessions not in cfg.sessions:
        cfg = replace(cfg, delay_sessions=max(cfg.sessions))
    to_stdout = args.json == "-"
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if to_stdout else print
    result = run(cfg, log=log)
    if to_stdout:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(text(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
            print(f"wrote {args.json}")
    if args.doc:
        doc, png = write_doc(result, Path(args.doc))
        print(f"wrote {doc} and {png}", file=sys.stderr if to_stdout else sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    from rnnzoo.errors import RnnzooError

    p = argparse.ArgumentParser(
        prog="python -m rnnzoo.benchmarks", description=__doc__.splitlines()[0]
    )
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_bench(args)
    except RnnzooError as exc:
        print(f"rnnzoo bench: error: {exc}", file=sys.stderr)
        return 2
