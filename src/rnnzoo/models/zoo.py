"""The zoo's registry: named entries whose task, model and training hyperparameters are plain
data, and their lookups (``REGISTRY``, ``get_entry``, ``select``). Building them (training,
hooks, resumability, progress) is ``rnnzoo.models.build``.

Floors (what a full build must reach) are data too: ``{"max_ratio": r}`` (metric / baseline
at most r), ``{"min_value": v}``, or ``{"beats": OTHER}`` (higher metric than entry OTHER);
``check_floor`` judges metrics against them. Quick builds (``quick=True``) train tiny versions
for tests and CI; their floors are reported but not claimed or enforced.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rnnzoo.errors import NotFound

DEFAULT_OUT = "zoo"


@dataclass(frozen=True)
class Entry:
    name: str
    group: str  # card section: forecast, lm, longrange, tagging, seq2seq
    task: str  # task registry name (rnnzoo.models.tasks.TASKS)
    model: dict[str, Any]  # config fields the task does not fix (cell, hidden_size, ...)
    train: dict[str, Any]  # TrainConfig fields
    floor: dict[str, Any]
    task_params: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, dict[str, Any]] = field(default_factory=dict)  # overrides: task/model/train
    notes: str = ""

    def resolved(self, quick: bool = False) -> tuple[dict, dict, dict]:
        """(task_params, model, train) with the quick overrides applied when asked."""
        q = self.quick if quick else {}
        return (
            {**self.task_params, **q.get("task", {})},
            {**self.model, **q.get("model", {})},
            {**self.train, **q.get("train", {})},
        )

    def make_task(self, quick: bool = False):
        """The entry's task (cached: entries sharing a task share its data)."""
        return _cached_task(self.task, json.dumps(self.resolved(quick)[0], sort_keys=True))

    def model_config(self, quick: bool = False) -> dict[str, Any]:
        """The full model config dict: the entry's fields plus what the task fixes."""
        task = self.make_task(quick)
        return {**self.resolved(quick)[1], **task.model_io()}

    @property
    def family(self) -> str:
        from rnnzoo.models.tasks import task_class

        return task_class(self.task).family

    @property
    def config(self):
        """The RNNConfig/Seq2SeqConfig of the full entry (builds its task: reads data)."""
        from rnnzoo.models.rnn import RNNConfig, Seq2SeqConfig

        cls = Seq2SeqConfig if self.family == "seq2seq" else RNNConfig
        return cls(**self.model_config())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "task": self.task,
            "task_params": self.task_params,
            "model": self.model,
            "train": self.train,
            "floor": self.floor,
            "quick": self.quick,
            "notes": self.notes,
        }


@functools.lru_cache(maxsize=16)
def _cached_task(name: str, params_json: str):
    """Entries sharing a task and its parameters share one built task (corpus read once)."""
    from rnnzoo.models.tasks import make_task

    return make_task(name, **json.loads(params_json))


# ---- the entries ---------------------------------------------------------------------------
# The long-range entries share one training budget so the comparison is fair.
_LONGRANGE_TRAIN = {
    "steps": 1200,
    "batch_size": 64,
    "lr": 1e-2,
    "clip": 1.0,
    "seed": 0,
    "probe_every": 50,
    "log_every": 25,
}
_LONGRANGE_QUICK = {"train": {"steps": 30, "probe_every": 10, "log_every": 5}}
_CHAR_QUICK = {
    "task": {"eval_chars": 4000},
    "model": {"hidden_size": 32},
    "train": {"steps": 20, "batch_size": 8},
}
_TAG_QUICK = {"task": {"train_chars": 60_000, "eval_chars": 8000}, "train": {"steps": 20}}


def _longrange(name: str, cell: str, notes: str, floor: dict[str, Any]) -> Entry:
    return Entry(
        name=name,
        group="longrange",
        task="adding",
        task_params={"seq_len": 100},
        model={"cell": cell, "hidden_size": 64},
        train=_LONGRANGE_TRAIN,
        floor=floor,
        quick=_LONGRANGE_QUICK,
        notes=notes,
    )


ENTRIES: list[Entry] = [
    Entry(
        name="sine-rnn",
        group="forecast",
        task="sines",
        model={"cell": "rnn_tanh", "hidden_size": 64},
        train={"steps": 600, "batch_size": 32, "lr": 3e-3, "seed": 0},
        floor={"max_ratio": 0.3},
        quick={"train": {"steps": 30}, "task": {"eval_size": 64}},
        notes="vanilla tanh RNN forecaster",
    ),
    Entry(
        name="sine-gru-scratch",
        group="forecast",
        task="sines",
        model={"cell": "gru_scratch", "hidden_size": 32},
        train={"steps": 300, "batch_size": 32, "lr": 5e-3, "seed": 0},
        floor={"max_ratio": 0.3},
        quick={"train": {"steps": 10}, "task": {"eval_size": 64}},
        notes="the hand-written GRU cell (src/rnnzoo/models/cells.py)",
    ),
    Entry(
        name="char-gru",
        group="lm",
        task="charlm",
        model={"cell": "gru", "hidden_size": 256, "embed_size": 32},
        task_params={"seq_len": 64},
        train={"steps": 450, "batch_size": 64, "lr": 4e-3, "seed": 0},
        floor={"max_ratio": 0.6},
        quick=_CHAR_QUICK,
        notes="1-layer GRU character LM",
    ),
    Entry(
        name="char-lstm-deep",
        group="lm",
        task="charlm",
        model={"cell": "lstm", "hidden_size": 192, "num_layers": 2, "embed_size": 32},
        task_params={"seq_len": 64},
        train={"steps": 450, "batch_size": 64, "lr": 4e-3, "seed": 0},
        floor={"max_ratio": 0.6},
        quick=_CHAR_QUICK,
        notes="2-layer LSTM character LM",
    ),
    _longrange("adding-rnn", "rnn_tanh", "tanh RNN: gradients vanish over ~90 steps", {}),
    _longrange("adding-rnn-relu", "rnn_relu", "ReLU RNN, same budget", {}),
    _longrange("adding-gru", "gru", "GRU, same budget", {"max_ratio": 0.1}),
    _longrange("adding-lstm", "lstm", "LSTM, same budget", {"max_ratio": 0.1}),
    Entry(
        name="tag-gru",
        group="tagging",
        task="pytag",
        model={"cell": "gru", "hidden_size": 64, "embed_size": 32},
        train={"steps": 400, "batch_size": 32, "lr": 5e-3, "seed": 0},
        floor={},
        quick=_TAG_QUICK,
        notes="unidirectional twin of tag-bigru",
    ),
    Entry(
        name="tag-bigru",
        group="tagging",
        task="pytag",
        model={"cell": "gru", "hidden_size": 64, "embed_size": 32, "bidirectional": True},
        train={"steps": 400, "batch_size": 32, "lr": 5e-3, "seed": 0},
        floor={"beats": "tag-gru"},
        quick=_TAG_QUICK,
        notes="bidirectional GRU tagger",
    ),
    Entry(
        name="tag-bilstm",
        group="tagging",
        task="pytag",
        model={"cell": "lstm", "hidden_size": 64, "embed_size": 32, "bidirectional": True},
        train={"steps": 400, "batch_size": 32, "lr": 5e-3, "seed": 0},
        floor={"beats": "tag-gru"},
        quick=_TAG_QUICK,
        notes="bidirectional LSTM tagger",
    ),
    Entry(
        name="num2words",
        group="seq2seq",
        task="num2words",
        model={"cell": "gru", "hidden_size": 128, "embed_size": 32},
        train={"steps": 1200, "batch_size": 64, "lr": 5e-3, "seed": 0},
        floor={"min_value": 0.9},
        quick={"train": {"steps": 30}, "task": {"eval_per_length": 20}},
        notes="GRU encoder-decoder, greedy decoding",
    ),
]
REGISTRY: dict[str, Entry] = {e.name: e for e in ENTRIES}


def get_entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise NotFound(f"unknown zoo entry {name!r}; known entries: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def select(only: Iterable[str] | None = None) -> list[Entry]:
    """Entries in registry order (twins before the entries that must beat them)."""
    if not only:
        return list(ENTRIES)
    wanted = {get_entry(n).name for n in only}  # raises on the first unknown name
    return [e for e in ENTRIES if e.name in wanted]


def check_floor(entry: Entry, metrics: dict[str, Any], others: dict[str, dict]) -> dict:
    """{"met": True/False/None, "text": ...}; None when the entry has no floor to check."""
    floor = entry.floor
    if "max_ratio" in floor:
        met = metrics["ratio"] <= floor["max_ratio"]
        return {"met": met, "text": f"{metrics['metric']} <= {floor['max_ratio']} x baseline"}
    if "min_value" in floor:
        met = metrics["value"] >= floor["min_value"]
        return {"met": met, "text": f"{metrics['metric']} >= {floor['min_value']}"}
    if "beats" in floor:
        other = others.get(floor["beats"])
        text = f"{metrics['metric']} > {floor['beats']}"
        if other is None:
            return {"met": None, "text": text + " (not built: unchecked)"}
        return {"met": metrics["value"] > other["value"], "text": text + f" ({other['value']:.4f})"}
    return {"met": None, "text": "none (shown for comparison)"}
