"""rnnzoo.v1 SessionSnapshot <-> the runtime's Snapshot (runtime/snapshot.py).

On the wire a snapshot is one sequence's states without the batch axis (like
CreateSessionRequest.initial_state) and, for a non-streamable session, its buffered chunks'
inputs; the runtime validates them against the model's contract on restore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from rnnzoo.proto.tensors import fill_tensors, from_tensors
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.server.runtime.snapshot import Snapshot

if TYPE_CHECKING:
    from rnnzoo.server.runtime.model import Chunk


def to_proto(snap: Snapshot, state: dict, initial: dict, buffer: list[dict]) -> pb.SessionSnapshot:
    # the runtime's snapshot names the version's key, "NAME@VERSION" (repository.py)
    name, sep, version = snap.model.rpartition("@")
    if not (sep and version.isdigit()):
        name, version = snap.model, "0"
    msg = pb.SessionSnapshot(
        model=name,
        model_hash=snap.model_hash,
        steps=snap.steps,
        model_source=snap.source,
        version=int(version),
    )
    fill_tensors(msg.state, state)
    fill_tensors(msg.initial_state, initial)
    for arrays in buffer:
        fill_tensors(msg.buffer.add().inputs, arrays)
    return msg


def from_proto(msg: pb.SessionSnapshot) -> Snapshot:
    """Raw arrays (batch-free); ``Runtime.restore_snapshot`` checks and shapes them. The
    model is the plain name: the servicer picks the version's key (``_snapshot_key``)."""
    return Snapshot(
        model=msg.model,
        model_hash=msg.model_hash,
        steps=msg.steps,
        state=from_tensors(msg.state, what="snapshot state"),
        initial=from_tensors(msg.initial_state, what="snapshot initial state"),
        # raw arrays: Runtime.restore_snapshot makes them Chunks
        buffer=cast(
            "list[Chunk]", [from_tensors(c.inputs, what="snapshot chunk") for c in msg.buffer]
        ),
        source=dict(msg.model_source),
    )
