"""The one place where rnnzoo errors become gRPC status codes, and every RPC gets a log line.

``grpc.aio`` interceptors see a method handler, not the call, so this one wraps the handler's
behaviour: unary and read/write-style streaming behaviours (coroutines that await
``context.write``) are awaited; async-generator streams are re-yielded item by item (an
exception raised while the servicer streams surfaces inside the wrapper's ``async for``, so
streams are mapped too). The rnnzoo.v1 and KServe v2 services are wrapped whole; reflection
(which manages its own statuses) gets the guard only, and health nothing.

Before the servicer runs, the wrapper applies the guard (``guard.py``: authentication, the
caller, the request-rate quota), admits the call (``admission.py``; over a limit:
RESOURCE_EXHAUSTED) and turns an undecodable unary request (``codec.Malformed``) into
INVALID_ARGUMENT. One wrapper for all of it: every layer of wrapper is resumed on every
``await`` of a stream, ~1 µs each time.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging

import grpc

from rnnzoo.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RnnzooError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

from . import metrics
from .admission import Admission
from .codec import Malformed
from .guard import Decision, Guard
from .handlers import handler_parts
from .logs import begin_call, log, now_ms

LOG = logging.getLogger("rnnzoo.rpc")
SERVICE_PREFIX = "/rnnzoo.v1.Rnnzoo/"
# the services this interceptor owns, by method prefix -> protocol (the log's "protocol")
PROTOCOLS = {SERVICE_PREFIX: "rnnzoo.v1", "/inference.GRPCInferenceService/": "kserve"}
REQUEST_ID_KEY = "rnnzoo-request-id"  # trailing metadata: the Stream request that failed

STATUS: dict[type[RnnzooError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Aborted: grpc.StatusCode.ABORTED,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}


def status_of(exc: RnnzooError) -> grpc.StatusCode:
    """The code of the nearest mapped class in the exception's MRO (subclasses included)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INVALID_ARGUMENT  # a bare RnnzooError is a user mistake


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The server's one interceptor: the guard (who may call), admission, the error->status
    mapping and the log line, in one wrapper per call."""

    def __init__(self, admission: Admission | None = None, guard: Guard | None = None) -> None:
        self.admission = admission
        self.guard = guard

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        guard = self.guard
        decision = guard.decide(handler_call_details) if guard is not None else None
        prefix = next((p for p in PROTOCOLS if method.startswith(p)), None)
        inner, factory = handler_parts(handler)
        if prefix is None:  # reflection and the like: the guard only (health: nothing)
            if decision is None:
                return handler
            wrapped = _guard_only(inner, guard, decision)
        else:
            enter = None if decision is None else functools.partial(guard.enter, decision)
            wrap = _wrap_stream if handler.response_streaming else _wrap_unary
            wrapped = wrap(
                method.removeprefix(prefix), inner, self.admission, PROTOCOLS[prefix], enter
            )
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _guard_only(behavior, guard: Guard, decision: Decision):
    """A service we do not map errors for (it sets its own statuses): refused calls get the
    guard's status, the rest run as they are."""

    async def refuse(context, exc: RnnzooError) -> None:
        await context.abort(status_of(exc), str(exc))

    if inspect.isasyncgenfunction(behavior):

        async def stream_wrapper(request, context):
            try:
                await guard.enter(decision, context)
            except RnnzooError as exc:  # refused, or its quota's store unreachable
                await refuse(context, exc)
            async for response in behavior(request, context):
                yield response

        return stream_wrapper

    async def wrapper(request, context):
        try:
            await guard.enter(decision, context)
        except RnnzooError as exc:  # refused, or its quota's store unreachable
            await refuse(context, exc)
        result = behavior(request, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    return wrapper


def _admit(rpc: str, request, context, admission: Admission | None):
    """The admission ticket (None: no admission control); raises for a refused call or an
    undecodable request."""
    ticket = admission.enter(rpc, context.peer()) if admission is not None else None
    if type(request) is Malformed:
        if ticket is not None:
            assert admission is not None  # a ticket comes from it
            admission.leave(ticket)
        raise request.error()
    return ticket


def _wrap_unary(
    rpc: str,
    behavior,
    admission: Admission | None = None,
    protocol: str = "rnnzoo.v1",
    enter=None,
):
    """``enter(context)``: the guard's, first (refused callers take no admission slot)."""

    async def wrapper(request, context):
        fields, t0 = begin_call(), now_ms()
        fields["protocol"] = protocol
        ticket = None
        try:
            if enter is not None:
                await enter(context)
            ticket = _admit(rpc, request, context, admission)
            return await behavior(request, context)
        except BaseException as exc:
            request = None  # see _handle: the request must not outlive the call
            await _handle(rpc, exc, context, fields)
            raise
        finally:
            if ticket is not None:
                admission.leave(ticket)
            _log_call(rpc, fields, t0)

    return wrapper


def _wrap_stream(
    rpc: str,
    behavior,
    admission: Admission | None = None,
    protocol: str = "rnnzoo.v1",
    enter=None,
):
    if not inspect.isasyncgenfunction(behavior):
        # a read/write-style streaming handler (it awaits context.write): wrap the one call
        return _wrap_unary(rpc, behavior, admission, protocol, enter)

    async def wrapper(request, context):
        fields, t0 = begin_call(), now_ms()
        fields["protocol"] = protocol
        ticket = None
        try:
            if enter is not None:
                await enter(context)
            ticket = _admit(rpc, request, context, admission)
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            request = None  # see _handle: the request must not outlive the call
            await _handle(rpc, exc, context, fields)
            raise
        finally:
            if ticket is not None:
                admission.leave(ticket)
            _log_call(rpc, fields, t0)

    return wrapper


async def _handle(rpc: str, exc: BaseException, context, fields: dict) -> None:
    """Abort the call with the mapped status (abort raises); records the code to log."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit) or _cancelled(context):
        # the client went away (a write or read of its cancelled call raised): nothing to
        # send, not an error of ours, no traceback (issue 21: 200 cancelled streams were
        # logged at error level with tracebacks and counted as INTERNAL)
        fields["code"] = "CANCELLED"
        exc.__traceback__ = None
        return
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()  # the servicer aborted on its own
        fields["code"] = code.name if isinstance(code, grpc.StatusCode) else str(code)
        return
    if isinstance(exc, RnnzooError):
        status, message = status_of(exc), str(exc)
    else:
        LOG.error("unexpected error", exc_info=exc, extra={"fields": {"rpc": rpc, **fields}})
        status = grpc.StatusCode.INTERNAL
        message = f"internal server error ({type(exc).__name__}); the server log has the details"
    # grpc keeps the AbortError that ``context.abort`` raises past the call (measured: not
    # reachable by the garbage collector, still alive after gc.collect()), and with it, as
    # its context, ``exc``. Its traceback's frames hold the request: a refused 5 M-token
    # request kept ~110 MB of decoded message alive per refusal. Drop the traceback (an
    # unexpected error was logged with it above); the wrapper drops its ``request``.
    exc.__traceback__ = None
    trailing: tuple = ()
    if "request_id" in fields:
        message = f"request_id={fields['request_id']}: {message}"
        trailing = ((REQUEST_ID_KEY, str(fields["request_id"])),)
    fields["code"], fields["error"] = status.name, message
    await context.abort(status, message, trailing_metadata=trailing)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def _cancelled(context) -> bool:
    """Did the client cancel this call (or its connection go away)?"""
    try:
        return bool(context.cancelled())
    except Exception:  # a context without the method (tests calling handlers directly)
        return False


def _log_call(rpc: str, fields: dict, t0: float) -> None:
    code = fields.pop("code", "OK")
    # A successful unary call is routine: debug (an info line per ModelInfer wrote 9.2 MB in
    # 10 minutes of light traffic). A stream's end, a cancel: info. Errors: warning.
    if code == "OK":
        level = logging.INFO if rpc in metrics.PER_MESSAGE or rpc in _STREAMS else logging.DEBUG
    else:
        level = logging.INFO if code == "CANCELLED" else logging.WARNING
    ms = now_ms() - t0
    # a refused authentication: the guard logs it (rate limited), not this line
    if LOG.isEnabledFor(level) and not fields.pop("quiet", False):
        log(LOG, "rpc", level, rpc=rpc, **fields, code=code, ms=round(ms, 3))
    metrics.call_ended(
        rpc,
        fields.get("protocol", "rnnzoo.v1"),
        code,
        ms / 1000.0,
        str(fields.get("model", "")),
        str(fields.get("version", "")),
    )


_STREAMS = frozenset({"Generate"})  # streaming calls besides the per-message ones
