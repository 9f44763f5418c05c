"""KServe v2 / Triton sequences: sessions of the state store under client-chosen ids.

A Triton client names its sequence (``sequence_id``: a non-zero int64 or a non-empty string)
and marks its first and last request (``sequence_start``, ``sequence_end``). Each live
sequence is a session of the state store like any other, whose id is derived from its key
(``SeqKey``: principal, model, id; ``session_id``): so it survives a restart with a store (a
SIGTERM or a kill -9), continues on any worker or replica sharing the store, and its unary
(ModelInfer) and streamed (ModelStreamInfer) requests mix freely, each one a session
transaction (transaction.py) as rnnzoo.v1's steps are: steps in order, the state committed
only when the response goes out, idle TTL, capacity, a stream's lease. The state tensors stay
implicit, as in Triton's implicit state management. Client ids are guessable, unlike session
ids, so a sequence is found only under the principal that started it (``principal``: the
authenticated name; without authentication "", so a sequence survives a reconnect).

The semantics (docs/kserve.md has the table):
- id 0 / "": no sequence; the request is whole-sequence inference from the initial state
  (any batch size), ``sequence_start``/``sequence_end`` then are InvalidArgument;
- an unknown id without ``sequence_start``: NotFound, saying so (and, for an id that lived,
  how it ended: by sequence_end, expired, evicted, with the time); never a fresh state;
- ``sequence_start``: a new session from the initial state; on an active id the sequence
  restarts: the request runs from the initial state and replaces the sequence's state only
  when it succeeds; a failed start changes nothing; an active id held by another open stream
  is FailedPrecondition;
- ``sequence_end``: after a successful request the session is closed and its store record
  deleted (the id is free and remembered here as ended); a failed request carrying it changes
  nothing, the sequence stays open; an idle sequence expires with the session TTL, and its
  store record with it;
- one request of a sequence carries one sequence: batch size 1.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from rnnzoo.contract import Contract
from rnnzoo.errors import FailedPrecondition, InvalidArgument, NotFound

from .caller import current
from .catalog import Catalog
from .core import SessionCore
from .lease import Lease, new_holder
from .redact import clip
from .session_ops import SessionOps
from .stepping import Stepper, with_batch
from .transaction import Transaction

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

    def session_id(self) -> str:
        """The id of this sequence's session: the same in every process and after a
        restart (sha256 of the key; a session id's length and alphabet)."""
        raw = json.dumps([self.principal, self.model, type(self.id).__name__, str(self.id)])
        digest = hashlib.sha256(raw.encode()).digest()[:24]
        return "q" + base64.urlsafe_b64encode(digest).decode()[1:]


@dataclass(frozen=True, slots=True)
class SeqResult:
    outputs: dict[str, np.ndarray]  # with the batch axis (size 1), as the request had
    start: int  # index in the sequence of the first returned step
    steps_total: int
    revised: bool  # bidirectional models: outputs re-cover the whole prefix
    sequence: bool  # False: id 0, stateless inference


class Holder:
    """A stream's hold on the sessions of the sequences it drives (their leases)."""

    def __init__(self, core: SessionCore, alive: Callable[[], bool] | None = None) -> None:
        self.core = core
        self.id = new_holder()
        self.alive = alive
        self.leases: dict[str, Lease] = {}

    async def lease(self, sid: str) -> Lease:
        lease = self.leases.get(sid)
        if lease is None or not self.core.sessions.leases.current(lease):
            if lease is not None:
                self.release(sid)
            lease = self.leases[sid] = await self.core.attach(sid, self.id, self.alive)
        return lease

    def release(self, sid: str) -> None:
        lease = self.leases.pop(sid, None)
        if lease is not None:
            self.core.detach(sid, lease)

    async def release_all(self) -> None:
        for sid in list(self.leases):
            self.release(sid)
        await self.core.released()


def sequence_id(value: object) -> int | str:
    """A request's sequence id as given (int or str); 0 and "" mean no sequence."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"sequence_id must be an integer or a string, got {value!r}")
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        raise InvalidArgument(f"sequence_id {value} does not fit 64 bits")
    if isinstance(value, str) and len(value) > 256:
        raise InvalidArgument(f"sequence_id is {len(value)} characters; at most 256 allowed")
    return value


Stateless = Callable[[str, dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]


class Sequences:
    """KServe sequences on the session core."""

    def __init__(
        self,
        core: SessionCore,
        ops: SessionOps,
        stepper: Stepper,
        catalog: Catalog,
        stateless: Stateless,
    ) -> None:
        self.core = core
        self.ops = ops
        self.stepper = stepper
        self.catalog = catalog
        self.stateless = stateless

    def _unknown(self, key: SeqKey, gone: NotFound | None) -> NotFound:
        m = _GONE.search(str(gone)) if gone is not None else None
        if m is not None:
            why = m.group(1)
            return NotFound(f"{key.describe()} was {why}; start it again with sequence_start=true")
        return NotFound(
            f"no active {key.describe()}: its first request must carry sequence_start=true "
            "(and, with authentication, come from the principal that started it)"
        )

    def _not_held(self, key: SeqKey, sid: str, lease: Lease | None, what: str) -> None:
        sess = self.core.sessions.get(sid, touch=False)
        holder = self.core.records.held_elsewhere(sess, lease)
        if holder is not None:
            where = "" if holder == "" else " on another server process"
            raise FailedPrecondition(
                f"{key.describe()} is held by an open stream (ModelStreamInfer{where}), which "
                f"owns it while it is open: {what} from elsewhere is refused; send the request "
                "over that stream, or end that stream first"
            )

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
            outputs = await self.stateless(model, inputs)
            yield SeqResult(outputs, 0, _steps(self.catalog, model, outputs), False, False)
            return
        self.core.check()
        if principal is None:  # the authenticated caller's (caller.py), else the default
            caller = current()
            principal = caller.principal if caller is not None else None
        key = SeqKey(principal or "", model, seq_id)
        sid = key.session_id()
        try:
            sess = await self.core.records.fresh(sid)
            active, gone = True, None
        except NotFound as exc:
            active, gone = False, exc
        # a live sequence runs on its session's model version to its end (repository.py)
        version = sess.model if active else model
        _, graph = self.catalog.single(version, "a sequence")
        if gone is not None and not start:
            raise self._unknown(key, gone) from None
        contract = graph.contract
        chunk = _unbatch(contract, inputs)
        prepared = self.stepper.prepare(version, chunk)  # validated before any session change
        created = False
        if active:
            held = holder.leases.get(sid) if holder is not None else None
            self._not_held(key, sid, held, "restarting it" if start else "this request")
        else:
            await self.ops.create(model, sid=sid)
            created = True
        try:
            pinned = self.core.sessions.get(sid, touch=False).model  # its version's key
            if self.catalog.entry(pinned) is not prepared.entry:
                prepared = self.stepper.prepare(pinned, chunk)
            lease = await holder.lease(sid) if holder is not None else None
            prepared.restart = start and not created
            compute = self.stepper.chunk
            what = f"a request of {key.describe()}"
            async with Transaction(self.core, sid, lease, None, compute, prepared, what) as res:
                yield SeqResult(
                    with_batch(contract, res.outputs), res.start, res.steps_total, res.revised, True
                )
        except BaseException:
            if created:  # a start that failed: as if it never came
                if holder is not None:
                    holder.release(sid)
                with contextlib.suppress(Exception):
                    await self.ops.close(sid, None, "closed (its first request failed)")
            raise
        if end:
            lease = holder.leases.get(sid) if holder is not None else None
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.core.sessions.wall()))
            with contextlib.suppress(NotFound):
                await self.ops.close(sid, lease, f"ended by sequence_end at {stamp}")
            if holder is not None:
                holder.release(sid)


def _unbatch(contract: Contract, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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


def _steps(catalog: Catalog, model: str, outputs: dict[str, np.ndarray]) -> int:
    contract = catalog.entry(model).info.contract
    for spec in contract.outputs:
        if spec.time_axis is not None and spec.name in outputs:
            return int(outputs[spec.name].shape[spec.time_axis])
    return 1
