"""A session's state as data: what SnapshotSession returns, CreateSession restores, ForkSession
copies and a state store (``store.py``) keeps.

``Snapshot`` holds the state of ONE sequence as the session keeps it (batch-1 arrays), its
position (steps), the chunks a non-streamable session buffered, and the model's identity:
name and ``model_hash`` (sha256 of the ONNX graph files and their contracts; a snapshot
restores only onto the same model version). ``meta`` carries the store-only fields
(created_at, ttl_s, owner, quota key): never sent to clients.

``to_bytes``/``from_bytes`` are the store's format: a JSON header and the arrays' raw
bytes (no pickle). The transport converts to and from the proto message itself.
``result_to_bytes``/``result_from_bytes``: a step's result (the replay record kept for
position-based deduplication) in the same format, protocol-neutral: each RPC encodes its own
response from it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from .model import Chunk, ServedModel
from .options import StepResult


@dataclass(slots=True)
class Snapshot:
    model: str
    model_hash: str
    steps: int
    state: dict[str, np.ndarray]  # batch-1, as the session keeps it
    initial: dict[str, np.ndarray]  # batch-1
    buffer: list[Chunk] = field(default_factory=list)  # non-streamable: chunks so far
    source: dict[str, str] = field(default_factory=dict)  # the contract's model version
    meta: dict[str, Any] = field(
        default_factory=dict
    )  # store-only: created_at, ttl_s, owner, quota_key


def model_hash(graphs: list[ServedModel]) -> str:
    """sha256 (hex) over each graph's ONNX bytes and contract JSON, in role order."""
    cached = getattr(graphs[0], "_rnnzoo_hash", None) if len(graphs) == 1 else None
    if cached is not None:
        return cast(str, cached)  # set below, from a hexdigest
    h = hashlib.sha256()
    for g in graphs:
        h.update(g.path.read_bytes())
        h.update(g.contract.to_json().encode())
    digest = h.hexdigest()
    if len(graphs) == 1:
        graphs[0]._rnnzoo_hash = digest  # type: ignore[attr-defined]
    return digest


MAGIC = b"RZS1"  # format 1: magic, u32 header length, JSON header, raw array bytes


def _pack(head: dict[str, object], arrays: list[tuple[str, np.ndarray]]) -> bytes:
    """A JSON header (``head`` plus each array's name, dtype, shape and byte range) and the
    arrays' raw C-order bytes."""
    index, blobs, offset = [], [], 0
    for name, a in arrays:
        b = np.ascontiguousarray(a).tobytes()
        index.append([name, a.dtype.str, list(a.shape), offset, len(b)])
        blobs.append(b)
        offset += len(b)
    data = json.dumps({**head, "arrays": index}).encode()
    return b"".join([MAGIC, len(data).to_bytes(4, "little"), data, *blobs])


def _unpack(data: bytes, what: str) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    if data[:4] != MAGIC:
        raise ValueError(f"not an rnnzoo {what} (format 1)")
    n = int.from_bytes(data[4:8], "little")
    head = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    arrays = [
        (name, np.frombuffer(body[off : off + size], np.dtype(dtype)).reshape(shape).copy())
        for name, dtype, shape, off, size in head["arrays"]
    ]
    return head, arrays


def to_bytes(snap: Snapshot) -> bytes:
    """The store's format: a JSON header naming each array (dtype, shape, byte range) and the
    arrays' raw C-order bytes. No pickle; ~10x cheaper than an .npz (it runs per step)."""
    arrays: list[tuple[str, np.ndarray]] = [(f"s/{k}", v) for k, v in snap.state.items()]
    arrays += [(f"i/{k}", v) for k, v in snap.initial.items()]
    lengths = []
    for n, chunk in enumerate(snap.buffer):
        lengths.append(chunk.length)
        arrays += [(f"b/{n}/{k}", v) for k, v in chunk.arrays.items()]
    head = {
        "model": snap.model,
        "model_hash": snap.model_hash,
        "steps": snap.steps,
        "source": snap.source,
        "meta": snap.meta,
        "buffer": lengths,
    }
    return _pack(head, arrays)


def initial_size(snap: Snapshot) -> int:
    """How many bytes ``to_bytes(snap)`` ends with that are its initial state's arrays (0 with
    a buffer: its chunks come last)."""
    return 0 if snap.buffer else sum(a.nbytes for a in snap.initial.values())


def from_bytes(data: bytes) -> Snapshot:
    head, arrays = _unpack(data, "session snapshot")
    state, initial = {}, {}
    chunks: list[dict[str, np.ndarray]] = [{} for _ in head["buffer"]]
    for name, a in arrays:
        kind, _, rest = name.partition("/")
        if kind == "s":
            state[rest] = a
        elif kind == "i":
            initial[rest] = a
        else:
            idx, _, key = rest.partition("/")
            chunks[int(idx)][key] = a
    buffer = [Chunk(a, length) for a, length in zip(chunks, head["buffer"], strict=True)]
    return Snapshot(
        head["model"],
        head["model_hash"],
        int(head["steps"]),
        state,
        initial,
        buffer,
        head.get("source", {}),
        head.get("meta", {}),
    )


def result_to_bytes(res: StepResult) -> bytes:
    """A step's result as the store keeps it for a retry of its position (any RPC kind).
    The same bytes as ``_pack`` of its header and outputs, with the outputs' index encoded
    once per shape (``_result_index``): this runs on every durable step."""
    outs = res.outputs
    index = _result_index(tuple([(k, a.dtype.str, a.shape) for k, a in outs.items()]))
    head = b'{"start": %d, "steps_total": %d, "revised": %b, "arrays": %b}' % (
        res.start,
        res.steps_total,
        b"true" if res.revised else b"false",
        index,
    )
    parts = [MAGIC, len(head).to_bytes(4, "little"), head]
    # C order whatever the layout (no ascontiguousarray copy first: 2.35 -> 1.65 us a result)
    parts += [a.tobytes() for a in outs.values()]
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _result_index(layout: tuple[tuple[str, str, tuple[int, ...]], ...]) -> bytes:
    """The JSON index of outputs laid out as ``layout`` (name, dtype, shape), as ``_pack``
    writes it."""
    index, offset = [], 0
    for name, dtype, shape in layout:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        index.append([name, dtype, list(shape), offset, size])
        offset += size
    return json.dumps(index).encode()


def result_from_bytes(data: bytes) -> StepResult:
    head, arrays = _unpack(data, "step result")
    return StepResult(
        dict(arrays), int(head["start"]), int(head["steps_total"]), bool(head["revised"])
    )


class StepEncoder:
    """``to_bytes`` for a session's per-step writes, with everything that does not change
    from step to step encoded once: the JSON header around ``steps`` (model, hash, source,
    store-only meta, the arrays' index) and the initial state's bytes. A step then costs one
    ``tobytes`` per state array and a join, and makes the same bytes as ``to_bytes``.
    Profiled before (64 sessions x 1 step, Redis): ``to_bytes`` took 66 us of a step's write
    under cProfile, half of it ``json.dumps`` of unchanging fields. Streamable sessions only
    (a buffered prefix changes every step: that goes through ``to_bytes``).

    Whether the cached header still fits is checked by identity: the session's ``meta`` dict
    is made once per session copy (durable.Records), ``source`` comes from a per-entry cache
    and ``initial`` is the session's own dict (its arrays too, in case one is replaced); all
    are held here, so an identity cannot be reused, and none is changed in place (a change
    makes a new dict). Only the state arrays' names, dtypes and shapes are compared per step. The key tuple of every field this
    replaced cost ~6 of the 9 us an encode took (2-core AMD EPYC, the benchmark's LSTM:
    ``python -m rnnzoo.benchmarks.write_parts``); 2.5 us after."""

    __slots__ = ("_held", "_layout", "_post", "_pre", "_tail")

    _MARK = 8_207_394_611_509_271  # a steps value no header holds otherwise

    def __init__(self) -> None:
        # what the header was made for, held (identity is safe): model, hash, meta, source,
        # the initial dict and its arrays
        self._held: tuple[Any, ...] = ()
        self._layout: tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...] = ()
        self._pre = self._post = b""  # the header before and after the steps value
        self._tail = b""  # the initial arrays' bytes

    def encode(self, snap: Snapshot, initial: dict[str, np.ndarray]) -> bytes:
        """``to_bytes(snap)``; ``initial``: the session's own initial dict (``snap.initial``
        may be a copy of it), compared by identity to keep the cached header."""
        if snap.buffer:
            return to_bytes(snap)
        state = snap.state
        if not self._fits(snap, initial):
            self._build(snap, initial)
        head = b"%b%d%b" % (self._pre, snap.steps, self._post)
        parts = [MAGIC, len(head).to_bytes(4, "little"), head]
        parts += [a.tobytes() for a in state.values()]  # C order whatever the layout
        parts.append(self._tail)
        return b"".join(parts)

    def tail_size(self, snap: Snapshot) -> int:
        """``initial_size`` of the snapshot ``encode`` was just given, without the sum."""
        return 0 if snap.buffer else len(self._tail)

    def _fits(self, snap: Snapshot, initial: dict[str, np.ndarray]) -> bool:
        """Whether the cached header and initial bytes are ``snap``'s (see the class)."""
        held = self._held
        if (
            not held
            or held[2] is not snap.meta
            or held[3] is not snap.source
            or held[4] is not initial
            or held[0] != snap.model
            or held[1] != snap.model_hash
            or len(snap.state) != len(self._layout)
            or len(initial) != len(held) - 5
        ):
            return False
        for a, b in zip(held[5:], initial.values(), strict=True):  # an array replaced in place
            if a is not b:
                return False
        for (name, dtype, shape), (k, a) in zip(self._layout, snap.state.items(), strict=True):
            if k != name or a.shape != shape or (a.dtype is not dtype and a.dtype != dtype):
                return False
        return True

    def _build(self, snap: Snapshot, initial: dict[str, np.ndarray]) -> None:
        marked = Snapshot(
            snap.model,
            snap.model_hash,
            self._MARK,
            snap.state,
            snap.initial,
            [],
            snap.source,
            snap.meta,
        )
        data = to_bytes(marked)
        n = int.from_bytes(data[4:8], "little")
        head = data[8 : 8 + n]
        before, mark, after = head.partition(b'"steps": %d,' % self._MARK)
        assert mark, "to_bytes no longer writes steps as expected"
        self._pre, self._post = before + b'"steps": ', b"," + after
        self._tail = b"".join(np.ascontiguousarray(a).tobytes() for a in snap.initial.values())
        self._held = (snap.model, snap.model_hash, snap.meta, snap.source, initial)
        self._held += tuple(initial.values())
        self._layout = tuple((k, a.dtype, a.shape) for k, a in snap.state.items())
