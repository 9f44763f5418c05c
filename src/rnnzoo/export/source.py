"""Where an export starts: a checkpoint file, or a zoo entry's name resolved to its checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rnnzoo.errors import NotFound
from rnnzoo.models.checkpoint import load_checkpoint
from rnnzoo.models.zoo import DEFAULT_OUT

CHECKPOINT_FILE = "model.pt"


def zoo_dir() -> Path:
    """The zoo build output folder (``RNNZOO_ZOO_DIR`` overrides the zoo's default)."""
    return Path(os.environ.get("RNNZOO_ZOO_DIR") or DEFAULT_OUT)


def resolve_checkpoint(arg: str) -> Path:
    """``arg`` is a checkpoint file, a folder holding model.pt, or a zoo entry name."""
    p = Path(arg)
    if p.is_file():
        return p
    if p.is_dir() and (p / CHECKPOINT_FILE).is_file():
        return p / CHECKPOINT_FILE
    cand = zoo_dir() / arg / CHECKPOINT_FILE
    if cand.is_file():
        return cand
    raise NotFound(
        f"{arg!r} is neither a checkpoint file nor a trained zoo entry (looked for {cand}); "
        f"run `rnnzoo train {arg}` or `rnnzoo zoo build` first, or pass the path to model.pt"
    )


def load(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode, checkpoint dict)."""
    model, ckpt = load_checkpoint(path)
    return model.eval(), ckpt
