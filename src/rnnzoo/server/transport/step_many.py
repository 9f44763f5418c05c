"""rnnzoo.v1 StepMany: one message carries one chunk for each of many sessions.

Each chunk is one Stream request as far as its session is concerned: the session is attached
(leased) to this call the first time a message names it, the chunk goes through the runtime's
``stepping`` transaction (positions and deduplication, the lease's fencing, the state store's
write-through before the response is sent, the commit after it), and its limits are a
Stream chunk's. What differs is the shape around the chunks:

- the chunks of one message run concurrently, so the batcher takes them in one turn: chunks of
  one model run as one ORT call, chunks of several models as one call per model;
- a chunk that fails gets a ``StreamResponse`` with ``error`` (the status a Stream would have
  ended with) in its place; the other chunks and the stream go on. Its session is detached
  (as a failed Stream detaches it) and re-attached by the next chunk that names it;
- a session named twice in one message: the later chunks are INVALID_ARGUMENT;
- the request-rate quota counts chunks (a message of N chunks is N requests; the call's
  first request was charged by the guard); a message over the quota fails all its chunks
  with RESOURCE_EXHAUSTED and none is applied;
- the response message must fit the server's message limit: the chunks whose results would
  push it over fail with RESOURCE_EXHAUSTED (before anything is written through the store);
- all results are written in one ``StepManyResponse``, results in the chunks' order; a chunk's
  new state is committed only once that message is written.

A message runs in phases over its chunks' transactions, driven from this one coroutine:
attach the sessions named for the first time (together) -> enter every chunk's transaction
(``transaction.enter_all``: one pass locks, checks and queues every chunk's batcher job, then
the results are awaited in order) -> build the responses and check the message's size ->
write every change through the store (``transaction.persist_all``: every write queued, one
store call) -> send the message -> commit each (``__aexit__``). No task per chunk: before
(issue 23) a task and about three loop callbacks per chunk were a quarter of the message's
Python function calls (1.36 M -> 1.02 M per 30 messages of 256 chunks, client included).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from rnnzoo.errors import InvalidArgument, ResourceExhausted, RnnzooError
from rnnzoo.proto.tensors import fill_tensors
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.server.runtime.lease import new_holder
from rnnzoo.server.runtime.redact import sid_tag
from rnnzoo.server.runtime.transaction import enter_all, persist_all

from . import metrics
from .codec import checked
from .convert import request_inputs
from .guard import charge
from .interceptors import status_of
from .logs import call_fields

LOG = logging.getLogger("rnnzoo.server")


class StepMany:
    """The StepMany handler of one servicer (``RnnzooServicer.StepMany`` calls ``run``)."""

    def __init__(self, servicer) -> None:
        self.svc = servicer
        self.rt = servicer.rt

    async def run(self, context) -> None:
        attached: dict[str, tuple[object, str]] = {}  # session -> (its lease, model)
        fields = call_fields()
        if fields is None:
            fields = {}
        holder = new_holder()
        count = 0

        def alive() -> bool:
            return not context.done()

        try:
            while (msg := await context.read()) is not grpc.aio.EOF:
                t0 = time.perf_counter()
                msg = checked(msg)
                count += 1
                fields["requests"] = count
                n = len(msg.chunks)
                # the request-rate quota, per chunk: the call's first request was charged
                over = None
                try:
                    wait = charge(n - 1 if count == 1 else n) if n > (count == 1) else None
                    if wait is not None:
                        await wait
                except ResourceExhausted as exc:
                    over = exc
                await self._message(msg, attached, holder, alive, context, over)
                metrics.request("StepMany", "rnnzoo.v1", "OK", time.perf_counter() - t0)
        finally:
            for sid, (lease, _) in attached.items():
                self.rt.detach(sid, lease)
            await self.rt.released()  # the client's next call finds the sessions free

    async def _message(self, msg, attached, holder, alive, context, over) -> None:
        reqs = list(msg.chunks)
        errors: list[BaseException | None] = [None] * len(reqs)
        seen: set[str] = set()
        for i, req in enumerate(reqs):
            sid = req.session_id
            if over is not None:
                errors[i] = over
            elif not sid:
                errors[i] = InvalidArgument("session_id is empty; set it in every chunk")
            elif sid in seen:
                errors[i] = InvalidArgument(
                    f"session {sid_tag(sid)} has more than one chunk in this message; send a "
                    "session at most once per StepMany message (concatenate its steps into "
                    "one chunk, or send the next chunk in the next message)"
                )
            else:
                seen.add(sid)
        # 0. sessions this call names for the first time: attached (leased) together
        new = [i for i, r in enumerate(reqs) if errors[i] is None and r.session_id not in attached]
        if new:
            got = await asyncio.gather(
                *(self._attach(reqs[i].session_id, holder, alive) for i in new),
                return_exceptions=True,
            )
            for i, g in zip(new, got, strict=True):
                if isinstance(g, BaseException):
                    errors[i] = g
                else:
                    attached[reqs[i].session_id] = g
        # the chunks that get past these checks and then fail detach their session (as a
        # failed Stream does); a repeated session's or an over-quota chunk does not
        checked_ok = [e is None for e in errors]
        # 1. each chunk's transaction, checked before anything is queued or locked
        txs: list = [None] * len(reqs)
        for i, req in enumerate(reqs):
            if errors[i] is not None:
                continue
            try:
                lease, model = attached[req.session_id]
                inputs = request_inputs(self.rt, model, req, batched=False)
                position = req.position if req.HasField("position") else None
                txs[i] = self.rt.stepping(req.session_id, inputs, lease, position, queued=True)
            except RnnzooError as exc:
                errors[i] = exc
        # 2. every chunk computed at once (the batcher takes them in one turn)
        live = [i for i, tx in enumerate(txs) if tx is not None]
        entered = await enter_all([txs[i] for i in live])
        results: list = [None] * len(reqs)
        held: list[int] = []  # chunks inside their transaction: each must be exited
        for i, r in zip(live, entered, strict=True):
            if isinstance(r, BaseException):
                errors[i] = r  # __aenter__ failed: nothing held
            else:
                results[i] = r
                held.append(i)
        try:
            # 3. the responses, built in place in the one message (no per-chunk message to
            # copy in), within the message limit; then written through the store
            out = pb.StepManyResponse()
            slots = self._results(out, reqs, results, errors)
            if out.ByteSize() > self.svc.max_response_bytes - 64:  # the message's framing
                self._over_limit(slots, held, errors)
            todo = [i for i in held if errors[i] is None]
            # every write queued, then awaited (a shared store: one store call for them all)
            done = await persist_all([txs[i] for i in todo])
            for i, d in zip(todo, done, strict=True):
                if d is not None:
                    errors[i] = d
            for i, err in enumerate(errors):
                if err is not None:  # its result (if any) replaced by its error, in place
                    req, slot = reqs[i], slots[i]
                    slot.Clear()
                    slot.request_id, slot.session_id = req.request_id, req.session_id
                    slot.error.code, slot.error.message = _status(err)
            await context.write(out)
        except BaseException as exc:  # not sent: nothing commits
            for i in held:
                await txs[i].__aexit__(type(exc), exc, None)
            raise
        # 4. sent: the chunks commit (a failed one only releases its lock)
        for i in held:
            err = errors[i]
            if err is None:
                await txs[i].__aexit__(None, None, None)
            else:
                await txs[i].__aexit__(type(err), err, None)
        for i, req in enumerate(reqs):
            if errors[i] is not None and checked_ok[i]:
                self._drop(req.session_id, attached)

    @staticmethod
    def _results(out, reqs, results, errors) -> list:
        """One result per chunk in ``out``, in the chunks' order: a computed chunk's outputs;
        an empty place for a chunk that failed (its error is written at the end)."""
        add = out.results.add
        slots = []
        for i, req in enumerate(reqs):
            res = results[i]
            if res is None or errors[i] is not None:
                slots.append(add())
                continue
            slot = add(
                request_id=req.request_id,
                session_id=req.session_id,
                start=res.start,
                steps_total=res.steps_total,
                revised=res.revised,
            )
            fill_tensors(slot.outputs, res.outputs)
            slots.append(slot)
        return slots

    def _over_limit(self, slots, held, errors) -> None:
        """The message is over the limit: in the chunks' order, each result that would take
        it over fails with RESOURCE_EXHAUSTED (before anything is written through the store);
        the rest stay."""
        budget = self.svc.max_response_bytes - 64  # the message's own framing
        for i in held:
            if errors[i] is not None:
                continue
            slot = slots[i]
            size = slot.ByteSize() + 8  # the field's tag and length
            try:
                self.svc._fits(slot)
                if size > budget:
                    raise ResourceExhausted(
                        "this chunk's result would take the StepMany response over this "
                        f"server's message limit of {self.svc.max_response_bytes} bytes; "
                        "send fewer sessions or steps per message"
                    )
            except ResourceExhausted as exc:
                errors[i] = exc
                continue
            budget -= size

    async def _attach(self, sid: str, holder: str, alive) -> tuple[object, str]:
        lease = await self.rt.attach(sid, holder, alive)
        info = self.rt.session_info(sid)  # the session's own model version
        return lease, f"{info.model}@{info.version}" if info.version else info.model

    def _drop(self, sid: str, attached: dict) -> None:
        entry = attached.pop(sid, None)
        if entry is not None:
            self.rt.detach(sid, entry[0])


def _status(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, RnnzooError):
        return status_of(exc).value[0], str(exc)
    LOG.error("unexpected error in a StepMany chunk", exc_info=exc)
    return (
        grpc.StatusCode.INTERNAL.value[0],
        f"internal server error ({type(exc).__name__}); the server log has the details",
    )
