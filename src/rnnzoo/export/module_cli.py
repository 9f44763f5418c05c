"""``rnnzoo export --factory pkg.mod:fn OUT.onnx`` and ``rnnzoo verify`` of such an export.

A factory is a callable, named ``package.module:function``, that takes no arguments and
returns ``(module, example_inputs)`` (weights loaded), or a dict with ``module``,
``example_inputs`` and any keyword of ``export_module`` (``name``, ``axes``, ``input_names``,
``output_names``, ``task``, ``labels``, ``vocab``, ``normalization``, ``description``).
A dict with ``step: True`` (and ``n_inputs``/``mode``/``state_names``) goes to
``export_step`` instead. The factory is recorded in the contract's ``source``, so
``rnnzoo verify OUT.onnx`` re-creates the module from it (``--factory`` names another).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rnnzoo.errors import FailedPrecondition, InvalidArgument, NotFound

MODULE_KEYS = {
    "name",
    "axes",
    "input_names",
    "output_names",
    "task",
    "labels",
    "vocab",
    "normalization",
    "description",
}
STEP_KEYS = {
    "name",
    "n_inputs",
    "mode",
    "input_names",
    "output_names",
    "state_names",
    "task",
    "labels",
    "description",
}


def load_factory(spec: str) -> dict[str, Any]:
    """Call the factory ``package.module:function``; returns its result as a dict."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise InvalidArgument(
            f"--factory {spec!r}: expected package.module:function (e.g. mypkg.models:make)"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current folder's packages
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise NotFound(f"--factory {spec!r}: cannot import {mod_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise NotFound(f"--factory {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InvalidArgument(f"--factory {spec!r}: {attr!r} is not callable")
    result = obj()
    if isinstance(result, tuple) and len(result) == 2:
        result = {"module": result[0], "example_inputs": result[1]}
    if not isinstance(result, dict) or not {"module", "example_inputs"} <= set(result):
        raise InvalidArgument(
            f"--factory {spec!r} returned {type(result).__name__}: it must return "
            "(module, example_inputs) or a dict with 'module' and 'example_inputs'"
        )
    allowed = (STEP_KEYS if result.get("step") else MODULE_KEYS) | {
        "module",
        "example_inputs",
        "step",
    }
    unknown = sorted(set(result) - allowed)
    if unknown:
        raise InvalidArgument(
            f"--factory {spec!r} returned unknown options {unknown}; known: {sorted(allowed)}"
        )
    return result


def export_factory(spec: str, out: str | Path, name: str | None = None) -> Any:
    """Export what the factory returns to ``out``; returns the contract."""
    from rnnzoo.export.module_export import export_module
    from rnnzoo.export.step_export import export_step

    made = load_factory(spec)
    module, example = made.pop("module"), made.pop("example_inputs")
    step = bool(made.pop("step", False))
    made["name"] = name or made.get("name") or Path(out).name.removesuffix(".onnx")
    source = {"factory": spec}
    if step:
        return export_step(module, example, out, source=source, **made)
    return export_module(module, example, out, source=source, **made)


def verify_factory(path: str | Path, spec: str | None, **kw: Any) -> Any:
    """Verify ``path`` against the module its factory (recorded, or ``spec``) makes."""
    from rnnzoo.contract import read_contract
    from rnnzoo.export.module_verify import verify_module

    contract = read_contract(path)
    spec = spec or contract.source.get("factory")
    if not spec:
        raise FailedPrecondition(
            f"{path}: its contract records no factory: pass --factory package.module:function"
        )
    return verify_module(load_factory(spec)["module"], path, **kw)


def _recorded_factory(path: str) -> str | None:
    from rnnzoo.contract import read_contract

    try:
        return read_contract(path).source.get("factory")
    except Exception:  # not ours to judge here: the checkpoint route reports it
        return None


def add_factory_routes(export_p: argparse.ArgumentParser, verify_p: argparse.ArgumentParser):
    """Add ``--factory`` to ``rnnzoo export`` and ``rnnzoo verify``, routing to this module."""
    export_p.add_argument(
        "--factory",
        metavar="PKG.MODULE:FN",
        help="export your own module: FN() returns (module, example_inputs) or a dict with "
        "options; the positional argument is then the output .onnx file (see docs/export.md)",
    )
    export_p.add_argument("--name", help="with --factory: the served model name (default: file)")
    verify_p.add_argument(
        "--factory",
        metavar="PKG.MODULE:FN",
        help="the factory that makes the module (default: the one recorded in its contract)",
    )
    plain_export: Callable = export_p.get_default("func")
    plain_verify: Callable = verify_p.get_default("func")

    def export_cmd(args: argparse.Namespace) -> int:
        if not args.factory:
            return plain_export(args)
        out = Path(args.model)
        if out.suffix != ".onnx":
            raise InvalidArgument(f"with --factory the positional argument is OUT.onnx, got {out}")
        contract = export_factory(args.factory, out, args.name)
        if not getattr(args, "no_verify", False):
            report = verify_factory(out, args.factory)
            if not report.ok:
                out.unlink()
                raise FailedPrecondition(
                    f"{out}: ONNX parity failed, so the file was removed (an exporter bug: "
                    f"please report it with the module). Summary:\n{report.summary()}"
                )
        print(out)
        why = contract.extra.get("streamable_reason", "")
        print(f"streamable: {str(contract.streamable).lower()} ({why})")
        return 0

    def verify_cmd(args: argparse.Namespace) -> int:
        spec = args.factory or _recorded_factory(args.model)
        if not spec:
            return plain_verify(args)
        from rnnzoo.export.module_verify import QUICK
        from rnnzoo.export.parity import report_json

        kw: dict[str, Any] = {"atol": args.atol, "rtol": args.rtol, "seed": args.seed}
        if args.quick:
            kw.update(QUICK)
        report = verify_factory(args.model, spec, **kw)
        print(report_json(report) if args.json else f"verified {args.model}\n{report.summary()}")
        if not report.ok:
            print(f"rnnzoo: error: {len(report.failures)} parity comparisons fail", file=sys.stderr)
            return 1
        return 0

    export_p.set_defaults(func=export_cmd)
    verify_p.set_defaults(func=verify_cmd)
