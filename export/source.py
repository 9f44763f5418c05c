"""Where an export starts: a checkpoint file, or a zoo entry's name resolved to its checkpoint.

``load`` prefers ``rnnzoo.models.checkpoint.load_checkpoint``; the checkpoint dict is the
one docs/design.md fixes, so a minimal reader of that format stands in where the models
package does not provide it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rnnzoo.errors import InvalidArgument, NotFound

CHECKPOINT_FORMAT = "rnnzoo.checkpoint/1"
CHECKPOINT_FILE = "model.pt"
DEFAULT_ZOO_DIR = "zoo"


def zoo_dir() -> Path:
    """The zoo build output folder: the zoo's own default if it declares one."""
    env = os.environ.get("RNNZOO_ZOO_DIR")
    if env:
        return Path(env)
    try:
        from rnnzoo.models import zoo
    except ImportError:
        return Path(DEFAULT_ZOO_DIR)
    for attr in ("DEFAULT_OUT", "DEFAULT_OUT_DIR", "ZOO_DIR", "DEFAULT_DIR"):
        if hasattr(zoo, attr):
            return Path(getattr(zoo, attr))
    return Path(DEFAULT_ZOO_DIR)


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
    try:
        from rnnzoo.models.checkpoint import load_checkpoint
    except ImportError:
        load_checkpoint = _load_checkpoint
    model, ckpt = load_checkpoint(path)
    return model.eval(), ckpt


def _load_checkpoint(path: str | Path) -> tuple[Any, dict[str, Any]]:
    import torch

    from rnnzoo.models.rnn import RecurrentNet, RNNConfig, Seq2Seq, Seq2SeqConfig

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidArgument(
            f"{path}: not a readable rnnzoo checkpoint ({type(exc).__name__}); retrain it"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InvalidArgument(f"{path}: not an {CHECKPOINT_FORMAT} checkpoint")
    if ckpt.get("family") == "seq2seq":
        model = Seq2Seq(Seq2SeqConfig(**ckpt["config"]))
    else:
        model = RecurrentNet(RNNConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt
