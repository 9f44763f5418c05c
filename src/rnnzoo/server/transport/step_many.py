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

Per chunk, three steps meet at two barriers (``_Chunk``): compute and build the response ->
(the message's size is checked) -> write through the store -> (the message is sent) -> commit.
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

from . import metrics
from .codec import checked
from .convert import request_inputs
from .guard import charge
from .interceptors import status_of
from .logs import call_fields

LOG = logging.getLogger("rnnzoo.server")

_SENT = object()  # a _Chunk's ``go`` result: proceed


class _Chunk:
    """One chunk's run through its session's ``stepping`` transaction, paced by the message:
    ``built`` is set with the response once computed; it waits for ``go`` (the size check)
    before writing through the store, sets ``persisted``, and waits for ``sent`` (the message
    written) before its block ends and commits. Any error ends the task with it; the chunk's
    result is then that error."""

    __slots__ = ("built", "go", "persisted", "req", "sent", "task")

    def __init__(self, req: pb.StreamRequest) -> None:
        loop = asyncio.get_running_loop()
        self.req = req
        self.built: asyncio.Future = loop.create_future()
        self.go: asyncio.Future = loop.create_future()
        self.persisted: asyncio.Future = loop.create_future()
        self.sent: asyncio.Future = loop.create_future()
        self.task: asyncio.Task | None = None


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
        chunks: list[_Chunk] = []
        errors: dict[int, BaseException] = {}
        seen: set[str] = set()
        for i, req in enumerate(msg.chunks):
            c = _Chunk(req)
            chunks.append(c)
            if over is not None:
                errors[i] = over
            elif req.session_id and req.session_id in seen:
                errors[i] = InvalidArgument(
                    f"session {sid_tag(req.session_id)} has more than one chunk in this "
                    "message; send a session at most once per StepMany message (concatenate "
                    "its steps into one chunk, or send the next chunk in the next message)"
                )
            else:
                seen.add(req.session_id)
                c.task = asyncio.ensure_future(self._chunk(c, attached, holder, alive))
        running = [c for c in chunks if c.task is not None]
        try:
            # 1. every chunk computed and its response built (or failed)
            await _each(running, "built")
            budget = self.svc.max_response_bytes - 64  # the message's own framing
            for c in running:
                if not _ok(c.built):
                    continue
                size = c.built.result().ByteSize() + 8  # the field's tag and length
                if size > budget:
                    c.go.set_exception(
                        ResourceExhausted(
                            f"this chunk's result would take the StepMany response over this "
                            f"server's message limit of {self.svc.max_response_bytes} bytes; "
                            "send fewer sessions or steps per message"
                        )
                    )
                else:
                    budget -= size
                    c.go.set_result(_SENT)
            # 2. every accepted chunk written through the store (or failed)
            await _each(running, "persisted")
            out = pb.StepManyResponse()
            for i, c in enumerate(chunks):
                err = errors.get(i) if c.task is None else _error_of(c)
                if err is None:
                    out.results.append(c.persisted.result())
                else:
                    res = out.results.add(request_id=c.req.request_id, session_id=c.req.session_id)
                    res.error.code, res.error.message = _status(err)
                    if c.task is not None:  # a failed chunk detaches its session (as Stream)
                        self._drop(c.req.session_id, attached)
            await context.write(out)
        except BaseException as exc:
            for c in running:
                for f in (c.go, c.sent):
                    if not f.done():
                        f.set_exception(exc if isinstance(exc, Exception) else _Stopped())
            await asyncio.gather(*(c.task for c in running), return_exceptions=True)
            raise
        # 3. sent: the chunks commit
        for c in running:
            if not c.sent.done():
                c.sent.set_result(_SENT)
        await asyncio.gather(*(c.task for c in running), return_exceptions=True)

    def _drop(self, sid: str, attached: dict) -> None:
        entry = attached.pop(sid, None)
        if entry is not None:
            self.rt.detach(sid, entry[0])

    async def _chunk(self, c: _Chunk, attached: dict, holder: str, alive) -> None:
        rt, req = self.rt, c.req
        try:
            sid = req.session_id
            if not sid:
                raise InvalidArgument("session_id is empty; set it in every chunk")
            if sid not in attached:
                lease = await rt.attach(sid, holder, alive)
                info = rt.session_info(sid)  # the session's own model version
                attached[sid] = (
                    lease,
                    f"{info.model}@{info.version}" if info.version else info.model,
                )
            lease, model = attached[sid]
            inputs = request_inputs(rt, model, req, batched=False)
            position = req.position if req.HasField("position") else None
            async with rt.stepping(sid, inputs, lease, position) as res:
                # a replayed position (applied before, by any RPC) answers the same
                resp = pb.StreamResponse(
                    request_id=req.request_id,
                    session_id=sid,
                    start=res.start,
                    steps_total=res.steps_total,
                    revised=res.revised,
                )
                fill_tensors(resp.outputs, res.outputs)
                self.svc._fits(resp)
                c.built.set_result(resp)
                await c.go
                await res.persist()  # before it goes out
                c.persisted.set_result(resp)
                await c.sent
        except BaseException as exc:
            for f in (c.built, c.persisted):
                if not f.done():
                    f.set_exception(exc)
                    f.exception()  # retrieved: read by _error_of
            raise


class _Stopped(Exception):
    """The message was not sent (the call ended): nothing commits."""


async def _each(chunks: list[_Chunk], name: str) -> None:
    """Until every chunk's future ``name`` is done (result or error)."""
    futs = [getattr(c, name) for c in chunks]
    pending = [f for f in futs if not f.done()]
    if pending:
        await asyncio.wait(pending)


def _ok(fut: asyncio.Future) -> bool:
    return fut.done() and not fut.cancelled() and fut.exception() is None


def _error_of(c: _Chunk) -> BaseException | None:
    f = c.persisted
    if f.cancelled():
        return _Stopped()
    return f.exception()


def _status(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, RnnzooError):
        return status_of(exc).value[0], str(exc)
    LOG.error("unexpected error in a StepMany chunk", exc_info=exc)
    return (
        grpc.StatusCode.INTERNAL.value[0],
        f"internal server error ({type(exc).__name__}); the server log has the details",
    )
