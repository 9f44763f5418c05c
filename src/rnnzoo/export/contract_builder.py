"""What a zoo graph's contract says beyond what ``export_module`` derives from the module.

``export_module`` builds every contract (tensor specs, axes, state pairs, streamability,
versions). For the zoo's own ``RecurrentNet`` graphs, ``zoo_graph`` adds what only the
checkpoint knows: the served tensor names of docs/design.md (``x``/``tokens``, ``h0``/``c0``,
``y``/``logits``, ``hn``/``cn``), their meanings, the task kind and its vocabularies, labels,
normalization and special tokens, and a seq2seq half's role and group.
"""

from __future__ import annotations

import platform
from typing import Any

from rnnzoo import __version__
from rnnzoo.contract import TASKS
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


def io_names(cfg: RNNConfig, kind: str, role: str) -> tuple[str, str]:
    """(data input name, data output name) per docs/design.md."""
    in_name = "tokens" if cfg.vocab_size is not None else "x"
    logits = role == "decoder" or kind in ("classify", "tag", "lm")
    return in_name, "logits" if logits else "y"


def zoo_graph(
    cfg: RNNConfig, task: dict[str, Any] | None, role: str = "model", group: str | None = None
) -> dict[str, Any]:
    """``export_graph`` keywords for one RecurrentNet graph called as ``(x, h0[, c0])``.

    ``task`` is the checkpoint's task dict. Returns ``input_names``, ``output_names``,
    ``axes``, ``task``, ``meanings`` and ``contract_fields``.
    """
    task = dict(task or {})
    kind = task.get("kind", "generic")
    if kind not in TASKS:
        kind = "generic"
    in_name, out_name = io_names(cfg, kind, role)
    states = list(cfg.state_names)
    meanings = {
        in_name: "token ids" if cfg.vocab_size is not None else "input features per step",
        out_name: MEANINGS[role] if role in ("encoder", "decoder") else MEANINGS[kind],
    }
    for s in states:
        meanings[f"{s}0"] = (
            f"{'hidden' if s == 'h' else 'cell'} state, (layers*directions, batch, hidden), "
            "index = layer*directions + direction"
        )
    special = {k: int(v) for k, v in (task.get("special_tokens") or {}).items()}
    vocab = task.get("vocab") or task.get("src_vocab") or task.get("source_vocab")
    target_vocab = task.get("target_vocab") or task.get("tgt_vocab")
    norm = task.get("normalization")
    fields = {
        "role": role,
        "group": group,
        "vocab": list(vocab) if vocab else None,
        "target_vocab": list(target_vocab) if target_vocab and role != "model" else None,
        "target_separator": str(task.get("target_separator", "")) if role != "model" else "",
        "labels": list(task["labels"]) if task.get("labels") else None,
        "normalization": {k: float(v) for k, v in norm.items()} if norm else None,
        "special_tokens": special,
        "description": str(task.get("description", "")),
    }
    batch_time = {"batch": 0, "time": 1}
    return {
        "input_names": [in_name, *(f"{s}0" for s in states)],
        "output_names": [out_name, *(f"{s}n" for s in states)],
        "axes": {in_name: batch_time, out_name: batch_time},
        "task": "seq2seq" if role in ("encoder", "decoder") else kind,
        "meanings": meanings,
        "contract_fields": fields,
    }


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
