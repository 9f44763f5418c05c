"""rnnzoo.v1 SessionSnapshot <-> the runtime's Snapshot (runtime/snapshot.py).

On the wire a snapshot is one sequence's states without the batch axis (like
CreateSessionRequest.initial_state) and, for a non-streamable session, its buffered chunks'
inputs; the runtime validates them against the model's contract on restore.
"""

from __future__ import annotations

from rnnzoo.proto.tensors import fill_tensors, from_tensors
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.server.runtime.snapshot import Snapshot


def to_proto(snap: Snapshot, state: dict, initial: dict, buffer: list[dict]) -> pb.SessionSnapshot:
    msg = pb.SessionSnapshot(
        model=snap.model, model_hash=snap.model_hash, steps=snap.steps, model_source=snap.source
    )
    fill_tensors(msg.state, state)
    fill_tensors(msg.initial_state, initial)
    for arrays in buffer:
        fill_tensors(msg.buffer.add().inputs, arrays)
    return msg


def from_proto(msg: pb.SessionSnapshot) -> Snapshot:
    """Raw arrays (batch-free); ``Runtime.restore_snapshot`` checks and shapes them."""
    return Snapshot(
        model=msg.model,
        model_hash=msg.model_hash,
        steps=msg.steps,
        state=from_tensors(msg.state, what="snapshot state"),
        initial=from_tensors(msg.initial_state, what="snapshot initial state"),
        buffer=[from_tensors(c.inputs, what="snapshot chunk") for c in msg.buffer],
        source=dict(msg.model_source),
    )
