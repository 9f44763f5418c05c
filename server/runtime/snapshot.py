"""A session's state as data: what SnapshotSession returns, CreateSession restores, ForkSession
copies and a state store (``store.py``) keeps.

``Snapshot`` holds the state of ONE sequence as the session keeps it (batch-1 arrays), its
position (steps), the chunks a non-streamable session buffered, and the model's identity:
name and ``model_hash`` (sha256 of the ONNX graph files and their contracts; a snapshot
restores only onto the same model version). ``meta`` carries the store-only fields
(created_at, ttl_s, owner, quota key): never sent to clients.

``to_bytes``/``from_bytes`` are the store's format: one ``.npz`` archive (no pickle) with
the metadata as JSON. The transport converts to and from the proto message itself.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np

from .model import Chunk, ServedModel


@dataclass
class Snapshot:
    model: str
    model_hash: str
    steps: int
    state: dict[str, np.ndarray]  # batch-1, as the session keeps it
    initial: dict[str, np.ndarray]  # batch-1
    buffer: list[Chunk] = field(default_factory=list)  # non-streamable: chunks so far
    source: dict[str, str] = field(default_factory=dict)  # the contract's model version
    meta: dict = field(default_factory=dict)  # store-only: created_at, ttl_s, owner, quota_key


def model_hash(graphs: list[ServedModel]) -> str:
    """sha256 (hex) over each graph's ONNX bytes and contract JSON, in role order."""
    cached = getattr(graphs[0], "_rnnzoo_hash", None) if len(graphs) == 1 else None
    if cached is not None:
        return cached
    h = hashlib.sha256()
    for g in graphs:
        h.update(g.path.read_bytes())
        h.update(g.contract.to_json().encode())
    digest = h.hexdigest()
    if len(graphs) == 1:
        graphs[0]._rnnzoo_hash = digest  # type: ignore[attr-defined]
    return digest


def to_bytes(snap: Snapshot) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    for k, v in snap.state.items():
        arrays[f"s/{k}"] = v
    for k, v in snap.initial.items():
        arrays[f"i/{k}"] = v
    lengths = []
    for n, chunk in enumerate(snap.buffer):
        lengths.append(chunk.length)
        for k, v in chunk.arrays.items():
            arrays[f"b/{n}/{k}"] = v
    head = {
        "model": snap.model, "model_hash": snap.model_hash, "steps": snap.steps,
        "source": snap.source, "meta": snap.meta, "buffer": lengths,
    }  # fmt: skip
    arrays["head"] = np.frombuffer(json.dumps(head).encode(), np.uint8)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def from_bytes(data: bytes) -> Snapshot:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        head = json.loads(z["head"].tobytes().decode())
        state, initial = {}, {}
        chunks: list[dict] = [{} for _ in head["buffer"]]
        for name in z.files:
            kind, _, rest = name.partition("/")
            if kind == "s":
                state[rest] = z[name]
            elif kind == "i":
                initial[rest] = z[name]
            elif kind == "b":
                n, _, key = rest.partition("/")
                chunks[int(n)][key] = z[name]
    buffer = [Chunk(a, length) for a, length in zip(chunks, head["buffer"], strict=True)]
    return Snapshot(
        head["model"], head["model_hash"], int(head["steps"]), state, initial, buffer,
        head.get("source", {}), head.get("meta", {}),
    )  # fmt: skip
