"""The ``rnnzoo`` command. Each subsystem registers its own subcommands.

A subsystem module exposes ``register(subparsers)``; it adds parsers whose
``func(args) -> int`` does the work. Modules are imported lazily so that
``rnnzoo serve`` never imports torch, and a serving-only install still runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rnnzoo import __version__
from rnnzoo.errors import RnnzooError

# (module, subcommands it provides, install hint if its imports are missing)
SUBSYSTEMS: list[tuple[str, tuple[str, ...], str]] = [
    ("rnnzoo.models.cli", ("zoo", "train"), "pip install 'rnnzoo[train]'"),
    ("rnnzoo.export.cli", ("export", "verify"), "pip install 'rnnzoo[train]'"),
    ("rnnzoo.server.cli", ("serve",), "pip install rnnzoo"),
    ("rnnzoo.client_cli", ("stream", "generate"), "pip install rnnzoo"),
    ("rnnzoo.contract_cli", ("contract",), "pip install rnnzoo"),
    ("rnnzoo.benchmarks.cli", ("bench",), "pip install 'rnnzoo[train]'"),
]


def _zoo_export_hook():
    """The zoo build's export step, wired here so that ``rnnzoo.models`` never imports
    ``rnnzoo.export`` (which imports models: the two would form a cycle)."""
    try:
        from rnnzoo.export.zoo_hook import after_train
    except ImportError as exc:
        raise UserError(
            f"the export step is not available ({exc}); pass --no-export to only train"
        ) from None
    return after_train


class UserError(RnnzooError):
    """A mistake on the command line; printed without a traceback, exit code 2."""


def _build_parser(wanted: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnzoo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rnnzoo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, commands, hint in SUBSYSTEMS:
        # Import only the subsystem that owns the command asked for (or all, for --help).
        if wanted is not None and wanted not in commands:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if wanted is None:
                continue  # help lists what this install can do
            raise UserError(
                f"`rnnzoo {wanted}` needs the package {exc.name!r}, which is not installed: {hint}"
            ) from None
        mod.register(sub)
    parser.set_defaults(export_hook=_zoo_export_hook)  # read by `zoo build`
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    known = {c for _, cmds, _ in SUBSYSTEMS for c in cmds}
    try:
        parser = _build_parser(wanted if wanted in known else None)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except RnnzooError as exc:
        print(f"rnnzoo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
