"""Checkpoints: a plain dict (docs/design.md) saved with ``torch.save``, read with
``weights_only=True`` so loading one never runs code from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rnnzoo.errors import InvalidArgument, NotFound
from rnnzoo.models.train import build_model

FORMAT = "rnnzoo.checkpoint/1"
REQUIRED = ("name", "family", "config", "task", "state_dict", "metrics", "train")


def make_checkpoint(
    name: str,
    family: str,
    model: nn.Module,
    task: dict[str, Any],
    metrics: dict[str, Any],
    train: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": name,
        "family": family,
        "config": model_config(model),
        "task": task,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": metrics,
        "train": train,
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (a temp file then rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, checked; ``NotFound``/``InvalidArgument`` name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise NotFound(f"{path}: no such checkpoint (train it with `rnnzoo train NAME`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle/zip errors of many kinds
        raise InvalidArgument(
            f"{path}: not a readable checkpoint ({type(exc).__name__}); the file is corrupt "
            "or not a checkpoint: retrain it with `rnnzoo train NAME`"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InvalidArgument(f"{path}: not an {FORMAT} checkpoint (format {got!r})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise InvalidArgument(f"{path}: checkpoint lacks {missing}; retrain it")
    return ckpt


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, checkpoint dict) from a checkpoint file or its folder."""
    ckpt = read_checkpoint(path)
    try:
        model = build_model(ckpt["family"], ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidArgument(
            f"{path}: its config and weights do not make a model ({exc}); retrain it"
        ) from None
    model.eval()
    return model, ckpt


def model_config(model: nn.Module) -> dict[str, Any]:
    """The config dict of a RecurrentNet or Seq2Seq (its ``cfg`` dataclass)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise TypeError(f"{type(model).__name__} has no config dataclass (.cfg) to checkpoint")
    config: dict[str, Any] = cfg.to_dict()
    return config
