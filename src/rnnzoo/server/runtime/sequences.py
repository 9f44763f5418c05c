"""KServe v2 / Triton sequences over rnnzoo sessions: client-chosen ids, same session store.

A Triton client names its sequence (``sequence_id``: a non-zero int64 or a non-empty string)
and marks its first and last request (``sequence_start``, ``sequence_end``). Here each live
sequence is an ordinary session of the runtime's ``SessionStore``: the same exactness (steps
in order, state committed only when the response goes out), idle TTL, capacity, eviction and
tombstones, and a stream's lease. The state tensors stay implicit, as in Triton's implicit
state management. What this module adds is the name: ``SeqKey`` (principal, model, id) ->
session id. Client ids are guessable, unlike session ids, so a sequence is found only under
the principal that started it (``principal``: the authenticated name; without
authentication the connection-independent default "", so a sequence survives a reconnect).

The semantics (docs/kserve.md has the table):
- id 0 / "": no sequence; the request is whole-sequence inference from the initial state
  (any batch size), ``sequence_start``/``sequence_end`` then are InvalidArgument;
- an unknown id without ``sequence_start``: NotFound, saying so (and, for an id that lived,
  how it ended: by sequence_end, expired, evicted, with the time); never a fresh state;
- ``sequence_start``: a new session from the initial state; on an active id the sequence
  restarts: the request runs from the initial state in a new session, which replaces the old
  one only when the request succeeds (the old is then closed); a failed start changes nothing;
  an active id held by another open stream is FailedPrecondition;
- ``sequence_end``: after a successful request the session is closed (the id is free and
  remembered as ended); a failed request carrying it changes nothing, the sequence stays open;
- one request of a sequence carries one sequence: batch size 1.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from rnnzoo.errors import FailedPrecondition, InvalidArgument, NotFound

from .caller import current
from .lease import Lease, new_holder
from .redact import clip

MAX_TOMBSTONES = 10_000
_GONE = re.compile(r" was (.*?)(?:; create a new session)?$", re.S)


@dataclass(frozen=True, slots=True)
class SeqKey:
    principal: str  # "" without authentication
    model: str
    id: int | str  # an int and a string id are different sequences (as in Triton)

    def describe(self) -> str:
        return f"sequence {clip(str(self.id)) if isinstance(self.id, str) else self.id!r}" + (
            f" of model {clip(self.model)!r}"
        )


@dataclass(frozen=True, slots=True)
class SeqResult:
    outputs: dict[str, np.ndarray]  # with the batch axis (size 1), as the request had
    start: int  # index in the sequence of the first returned step
    steps_total: int
    revised: bool  # bidirectional models: outputs re-cover the whole prefix
    sequence: bool  # False: id 0, stateless inference


class Holder:
    """A stream's hold on the sessions of the sequences it drives (their leases)."""

    def __init__(self, runtime, alive: Callable[[], bool] | None = None) -> None:
        self.rt = runtime
        self.id = new_holder()
        self.alive = alive
        self.leases: dict[str, Lease] = {}

    def lease(self, sid: str) -> Lease:
        lease = self.leases.get(sid)
        if lease is None:
            lease = self.leases[sid] = self.rt.attach(sid, self.id, self.alive)
        return lease

    def release(self, sid: str) -> None:
        lease = self.leases.pop(sid, None)
        if lease is not None:
            self.rt.detach(sid, lease)

    def release_all(self) -> None:
        for sid in list(self.leases):
            self.release(sid)


def sequence_id(value) -> int | str:
    """A request's sequence id as given (int or str); 0 and "" mean no sequence."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"sequence_id must be an integer or a string, got {value!r}")
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        raise InvalidArgument(f"sequence_id {value} does not fit 64 bits")
    if isinstance(value, str) and len(value) > 256:
        raise InvalidArgument(f"sequence_id is {len(value)} characters; at most 256 allowed")
    return value


class Sequences:
    """The (principal, model, id) -> session table of one runtime."""

    def __init__(self, runtime, max_tombstones: int = MAX_TOMBSTONES) -> None:
        self.rt = runtime
        self._live: dict[SeqKey, str] = {}
        self._dead: OrderedDict[SeqKey, str] = OrderedDict()
        self.max_tombstones = max_tombstones

    def __len__(self) -> int:
        return len(self._live)

    # ---- the table ---------------------------------------------------------------------------
    def _bury(self, key: SeqKey, why: str) -> None:
        self._live.pop(key, None)
        self._dead[key] = why
        self._dead.move_to_end(key)
        while len(self._dead) > self.max_tombstones:
            self._dead.popitem(last=False)

    def _alive(self, sid: str) -> NotFound | None:
        try:
            self.rt.store.get(sid, touch=False)
        except NotFound as exc:
            return exc
        return None

    def session_of(self, key: SeqKey) -> str | None:
        """The live session of ``key``, or None (a session that ended meanwhile, e.g. expired
        or evicted in the store, is buried here with the store's reason)."""
        sid = self._live.get(key)
        if sid is None:
            return None
        gone = self._alive(sid)
        if gone is not None:
            m = _GONE.search(str(gone))
            self._bury(key, m.group(1) if m else "ended")
            return None
        return sid

    def _prune(self) -> None:
        """Forget entries whose session is gone: the table never outgrows the store by much."""
        if len(self._live) <= 2 * self.rt.store.max_sessions:
            return
        for key in list(self._live):
            self.session_of(key)

    def _unknown(self, key: SeqKey) -> NotFound:
        why = self._dead.get(key)
        if why is not None:
            return NotFound(f"{key.describe()} was {why}; start it again with sequence_start=true")
        return NotFound(
            f"no active {key.describe()}: its first request must carry sequence_start=true "
            "(sequences are per server, and per principal with authentication)"
        )

    def active(self, key: SeqKey) -> bool:
        return self.session_of(key) is not None

    # ---- one request ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def inferring(
        self,
        model: str,
        seq_id: int | str,
        inputs: dict[str, np.ndarray],
        *,
        start: bool = False,
        end: bool = False,
        principal: str | None = None,
        holder: Holder | None = None,
    ) -> AsyncIterator[SeqResult]:
        """One request of a KServe sequence (or, id 0, a stateless one). ``inputs`` carry a
        batch axis. Yields the result; the sequence moves on (and starts, restarts or ends)
        only when the ``async with`` block ends without an error. ``holder``: the calling
        stream's, so its sequences' sessions are leased to it; None for a unary call (a
        sequence held by an open stream is then FailedPrecondition)."""
        seq_id = sequence_id(seq_id)
        if seq_id in (0, ""):
            if start or end:
                raise InvalidArgument(
                    "sequence_start/sequence_end need a sequence_id (non-zero int or non-empty "
                    "string); without one a request is stateless whole-sequence inference"
                )
            async with self.rt.inferring(model, inputs) as outputs:
                steps = _steps(self.rt, model, outputs)
                yield SeqResult(outputs, 0, steps, False, False)
            return
        contract = self.rt.get_model(model).contracts.get("model")
        if contract is None:  # seq2seq: the runtime says why (rnnzoo.v1 Generate)
            self.rt._single(model, "a sequence")
        chunk = _unbatch(contract, inputs)
        if principal is None:  # the authenticated caller's (caller.py), else the default
            caller = current()
            principal = caller.principal if caller is not None else None
        key = SeqKey(principal or "", model, seq_id)
        old = self.session_of(key)
        if old is None and not start:
            raise self._unknown(key)
        sid = old
        if start:
            if old is not None:
                held = self.rt.store.leases.holder_alive(old)
                if held is not None and (holder is None or holder.leases.get(old) is not held):
                    raise FailedPrecondition(
                        f"{key.describe()} is held by an open ModelStreamInfer, which owns it "
                        "while it is open: restarting it from elsewhere is refused; send the "
                        "request over that stream, or end that stream first"
                    )
            # validated before a session is made (a full store may evict one for it)
            self.rt.repo.entries[model].graphs["model"].validate_chunk(chunk)
            self._prune()
            sid = self.rt.create_session(model).id
            self._live[key] = sid  # concurrent requests of this id queue behind this one
        try:
            lease = holder.lease(sid) if holder is not None else None
            async with self.rt.stepping(sid, chunk, lease) as res:
                yield SeqResult(
                    _batch(contract, res.outputs), res.start, res.steps_total, res.revised, True
                )
        except BaseException:
            if sid != old:  # a start that failed: as if it never came
                self._discard(sid, holder)
                if self._live.get(key) == sid:
                    if old is not None:
                        self._live[key] = old
                    else:
                        self._live.pop(key, None)
            raise
        if old is not None and sid != old:  # restarted: the old session ends here
            self._close(old, holder)
        if end:
            self._close(sid, holder)
            if self._live.get(key) == sid:
                self._bury(key, f"ended by sequence_end at {_stamp(self.rt.store.wall())}")

    def _discard(self, sid: str, holder: Holder | None) -> None:
        if holder is not None:
            holder.release(sid)
        with contextlib.suppress(NotFound):
            self.rt.store.close(sid)

    def _close(self, sid: str, holder: Holder | None) -> None:
        lease = holder.leases.get(sid) if holder is not None else None
        with contextlib.suppress(NotFound):
            self.rt.close_session(sid, lease)
        if holder is not None:
            holder.release(sid)


def sequences_of(runtime) -> Sequences:
    """The runtime's sequence table (one per runtime, made on first use)."""
    table = getattr(runtime, "sequences", None)
    if table is None:
        table = runtime.sequences = Sequences(runtime)
    return table


def _stamp(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _unbatch(contract, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A request's batched inputs -> one sequence's chunk (batch size 1 required)."""
    specs = {s.name: s for s in contract.inputs}
    out = {}
    for name, arr in inputs.items():
        spec = specs.get(name)
        if spec is None or spec.batch_axis is None:
            out[name] = arr  # the runtime names unknown inputs and checks the rest
            continue
        if arr.ndim <= spec.batch_axis or arr.shape[spec.batch_axis] != 1:
            raise InvalidArgument(
                f"input {clip(name)!r}: a request of a sequence carries one sequence, so its "
                f"batch dim (axis {spec.batch_axis}) must be 1; got shape {list(arr.shape)}"
            )
        out[name] = np.take(arr, 0, axis=spec.batch_axis)
    return out


def _batch(contract, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One sequence's outputs -> with a batch axis of 1, as the request was sent."""
    out = {}
    for spec in contract.outputs:
        arr = outputs[spec.name]
        out[spec.name] = arr if spec.batch_axis is None else np.expand_dims(arr, spec.batch_axis)
    return out


def _steps(runtime, model: str, outputs: dict[str, np.ndarray]) -> int:
    contract = runtime.get_model(model).contract
    for spec in contract.outputs:
        if spec.time_axis is not None and spec.name in outputs:
            return int(outputs[spec.name].shape[spec.time_axis])
    return 1
