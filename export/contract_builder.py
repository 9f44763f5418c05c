"""The contract an exported graph carries: built from the model's config and its checkpoint.

Everything the serving side needs to run a graph without torch or zoo code: tensor names,
dtypes and symbolic axes, the state pairs and their layout, the task's vocabularies and
labels, whether it can stream, and where it came from (checkpoint hash, exporter versions).
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

from rnnzoo import __version__
from rnnzoo.contract import TASKS, Contract, StateSpec, TensorSpec
from rnnzoo.models.rnn import RNNConfig

BATCH, TIME = "batch", "time"

# What the data output means, by task kind (the decoder/encoder halves are roles, not tasks).
MEANINGS = {
    "forecast": "per-step prediction of the next value, in normalised units (see normalization)",
    "classify": "per-step class logits over labels; the last step has read the whole sequence",
    "tag": "per-step tag logits over labels",
    "lm": "per-step next-token logits over vocab",
    "generic": "per-step output of the head",
    "encoder": "top-layer hidden states per step (batch, time, directions*hidden)",
    "decoder": "per-step next-token logits over target_vocab",
}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def io_names(cfg: RNNConfig, kind: str, role: str) -> tuple[str, str]:
    """(data input name, data output name) per docs/design.md."""
    in_name = "tokens" if cfg.vocab_size is not None else "x"
    logits = role == "decoder" or kind in ("classify", "tag", "lm")
    return in_name, "logits" if logits else "y"


def exporter_versions() -> dict[str, str]:
    import onnx
    import onnxscript
    import torch

    return {
        "rnnzoo": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "python": platform.python_version(),
    }


def build_contract(
    cfg: RNNConfig,
    *,
    name: str,
    task: dict[str, Any] | None = None,
    role: str = "model",
    group: str | None = None,
    source: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Contract:
    """The contract of one RecurrentNet graph. ``task`` is the checkpoint's task dict."""
    task = dict(task or {})
    kind = task.get("kind", "generic")
    if kind not in TASKS:
        kind = "generic"
    in_name, out_name = io_names(cfg, kind, role)
    D, L, H = cfg.num_directions, cfg.num_layers, cfg.hidden_size
    if cfg.vocab_size is not None:
        x = TensorSpec(in_name, "int64", [BATCH, TIME], meaning="token ids")
    else:
        x = TensorSpec(
            in_name, "float32", [BATCH, TIME, cfg.input_size], meaning="input features per step"
        )
    feat = cfg.output_size if cfg.output_size > 0 else D * H
    meaning = MEANINGS[role] if role in ("encoder", "decoder") else MEANINGS[kind]
    y = TensorSpec(out_name, "float32", [BATCH, TIME, feat], meaning=meaning)
    states = [
        StateSpec(
            input=f"{s}0",
            output=f"{s}n",
            dtype="float32",
            shape=[L * D, BATCH, H],
            batch_axis=1,
            init="zeros",
            meaning=(
                f"{'hidden' if s == 'h' else 'cell'} state, (layers*directions, batch, hidden), "
                "index = layer*directions + direction"
            ),
        )
        for s in cfg.state_names
    ]
    special = {k: int(v) for k, v in (task.get("special_tokens") or {}).items()}
    vocab = task.get("vocab") or task.get("src_vocab") or task.get("source_vocab")
    target_vocab = task.get("target_vocab") or task.get("tgt_vocab")
    norm = task.get("normalization")
    contract = Contract(
        name=name,
        task="seq2seq" if role in ("encoder", "decoder") else kind,
        inputs=[x],
        outputs=[y],
        states=states,
        streamable=not cfg.bidirectional,
        role=role,
        group=group,
        vocab=list(vocab) if vocab else None,
        target_vocab=list(target_vocab) if target_vocab and role != "model" else None,
        target_separator=str(task.get("target_separator", "")) if role != "model" else "",
        labels=list(task["labels"]) if task.get("labels") else None,
        normalization={k: float(v) for k, v in norm.items()} if norm else None,
        special_tokens=special,
        description=str(task.get("description", "")),
        source={k: str(v) for k, v in (source or {}).items()},
        extra=dict(extra or {}),
    )
    contract.validate(origin=f"contract for {name}")
    return contract
