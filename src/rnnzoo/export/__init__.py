"""rnnzoo.export: torch -> ONNX, contracts, parity.

``export_module``, ``export_step`` and ``verify_module`` (docs/export.md) are importable from
here; they load torch on first use, so importing this package stays cheap for the CLI.
"""

from __future__ import annotations

from typing import Any

_PUBLIC = {
    "export_module": "rnnzoo.export.module_export",
    "export_step": "rnnzoo.export.step_export",
    "verify_module": "rnnzoo.export.module_verify",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'rnnzoo.export' has no attribute {name!r}")
