"""A synchronous client for an rnnzoo server: numpy in, numpy out.

    from rnnzoo.client import Client
    with Client("127.0.0.1:50051") as client:
        print([m.name for m in client.models()])
        with client.session("lstm") as s:          # closed on exit
            for x_t in signal:                     # x_t: (F,) one step, or (T, F) a chunk
                y = s.step(x_t)["y"]               # (T, O)
        for piece in client.generate("charlm", "the ", max_tokens=50):
            print(piece, end="")

Security: ``Client(target, token=...)`` sends ``authorization: Bearer <token>`` with every
call (servers started with ``--auth-tokens``); ``tls_ca=`` connects with TLS trusting that CA
(``tls=True``: the system's roots), ``tls_cert=``/``tls_key=`` add a client certificate for
mTLS. A token over a plaintext channel to another machine is refused.

Server errors surface as ``RpcError`` (a ``grpc.RpcError``) with the server's code and
message. ``Session.step`` keeps one ``Stream`` call open and sends one request per step;
``stream`` pipelines many chunks over one call. A failed step ends that call (the server
reports errors by ending the stream); the next ``step`` opens a new one and resumes the same
session, whose state the failed request did not change.

Session state as data: ``snapshot(session_id)`` returns a ``SessionSnapshot`` (state, steps,
model and its graph hash), ``restore(snapshot)`` opens a new session from one (on any server
that serves the same model version), ``fork(session_id)`` copies a session on the server.

Idempotent retries: ``Session.step`` sends the position it expects (steps before the chunk);
when the call fails with a status in ``RETRY_CODES`` (the server or the path to it died) it
reopens the stream and resends the chunk with the same position, for up to ``retry_s``
seconds. The server answers a chunk it already applied with the stored response, so a retry
never applies a step twice. Behind nginx, a replica killed mid-stream was seen to surface as
UNAVAILABLE (and INTERNAL for an HTTP/2 stream reset by the proxy); both are retried. While a
dead replica's lease on the session has not run out yet, the new replica answers
FAILED_PRECONDITION "... lease runs out in N s": that is retried too within ``retry_s``.

Deadlines: every unary call has ``timeout`` (30 s), and so has every step of a Stream
(``step_timeout``, default ``timeout``; None: none): a step not answered by then cancels its
call and fails with DEADLINE_EXCEEDED, which a session that knows its position retries (a
frozen replica is left behind: the resend goes over a new call, which a load balancer sends
to a replica that answers). ABORTED ("the outcome ... is unknown ... resend from position N")
is retried too when the session knows its position: the server answers a chunk that did land
from the store.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any, cast

import grpc
import numpy as np

from rnnzoo.client_results import (
    RETRY_CODES,
    RpcError,
    StepOutput,
    _retryable,
    _step_output,
)
from rnnzoo.errors import InvalidArgument
from rnnzoo.proto.tensors import from_tensors, to_tensors
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc
from rnnzoo.step_deadline import Watchdog

if TYPE_CHECKING:
    from rnnzoo.client_many import ManyStepper

# RpcError, StepOutput and RETRY_CODES live in client_results (shared with client_many) and
# are imported from here by users.
__all__ = ["RETRY_CODES", "Chunk", "Client", "RpcError", "Session", "StepOutput"]

Chunk = np.ndarray | Mapping[str, Any] | str  # an array (single-input models), named arrays, text


_END = object()


class Client:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float = 30.0,
        max_message_mb: int = 64,
        token: str | None = None,
        tls: bool | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        retry_s: float = 60.0,
        own_connection: bool = False,
        step_timeout: float | EllipsisType | None = ...,
    ) -> None:
        """``own_connection``: a connection of this client's own, not shared with other
        clients of the same target in this process (a server with several workers balances
        connections, not calls). ``token``: bearer token sent with every call. ``tls``: connect with TLS (default:
        when any ``tls_*`` is given); ``tls_ca``: PEM file of the CA to trust (default: the
        system's); ``tls_cert``/``tls_key``: PEM files of a client certificate (mTLS);
        ``tls_server_name``: the name to check the server's certificate against, when it is
        not the target's host. ``step_timeout``: the deadline of each ``Session.step``
        (default: ``timeout``; None: no deadline)."""
        size = int(max_message_mb * (1 << 20))
        self.target, self.timeout, self.retry_s = target, timeout, retry_s
        self.step_timeout = timeout if step_timeout is ... else step_timeout
        if self.step_timeout is not None and not self.step_timeout > 0:
            raise InvalidArgument(f"step_timeout must be > 0 or None, got {self.step_timeout}")
        self._watchdog = Watchdog()
        if (tls_cert is None) != (tls_key is None):
            raise InvalidArgument("a client certificate needs both tls_cert and tls_key")
        if tls is None:
            tls = any(v is not None for v in (tls_ca, tls_cert, tls_server_name))
        host = target.rsplit(":", 1)[0].strip("[]")
        local = (
            host in ("localhost", "::1") or host.startswith("127.") or target.startswith("unix:")
        )
        if token is not None and not tls and not local:
            raise InvalidArgument(
                f"refusing to send a bearer token in clear text to {target}; connect with TLS "
                "(tls_ca=... or tls=True)"
            )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options: list[tuple[str, str | int]] = (
            [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        )
        options += [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # notice a dead server or path while a stream waits (the server allows a
            # ping every 10 s; see docs/limits.md)
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.ping_timeout_ms", 10_000),
        ]
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        if tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca, "tls_ca"),
                private_key=_read(tls_key, "tls_key"),
                certificate_chain=_read(tls_cert, "tls_cert"),
            )
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.RnnzooStub(self.channel)
        self._models: dict[str, pb.ModelInfo] = {}
        self._session_models: dict[str, str] = {}  # session id -> model (for step_many)
        self._many: ManyStepper | None = (
            None  # the open StepMany call (client_many.ManyStepper), made on first use
        )

    # ---- plumbing ------------------------------------------------------------------------
    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise RpcError.wrap(err) from None

    def close(self) -> None:
        if self._many is not None:
            self._many.close()
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (not that the models are loaded: see health)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE, f"no server at {self.target} after {timeout} s"
            ) from None

    # ---- models --------------------------------------------------------------------------
    def models(self) -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest()).models)

    def model(self, name: str) -> pb.ModelInfo:
        if name not in self._models:
            self._models[name] = self._call(self.stub.GetModel, pb.GetModelRequest(name=name))
        return self._models[name]

    # ---- sessions ------------------------------------------------------------------------
    def create_session(
        self,
        model: str,
        initial_state: Mapping[str, np.ndarray] | None = None,
        ttl_s: float | None = None,
        version: int | None = None,
    ) -> pb.Session:
        """``ttl_s``: this session's idle expiry in seconds, at most the server's (None: the
        server's); ``version``: the model version to run on (None: the newest ready one; the
        session keeps it to its end either way, ``.version`` of the result says which)."""
        req = pb.CreateSessionRequest(
            model=model, initial_state=to_tensors(initial_state or {}), ttl_s=ttl_s, version=version
        )
        info = self._call(self.stub.CreateSession, req)
        self._session_models[info.session_id] = info.model
        return info

    def snapshot(self, session_id: str) -> pb.SessionSnapshot:
        """The session's state as data (keep it secret: it encodes what the session saw)."""
        req = pb.SnapshotSessionRequest(session_id=session_id)
        return self._call(self.stub.SnapshotSession, req)

    def restore(self, snapshot: pb.SessionSnapshot | bytes, ttl_s: float | None = None) -> Session:
        """A new session at ``snapshot`` (a SessionSnapshot or its bytes), on this server."""
        if isinstance(snapshot, bytes):
            snapshot = cast(pb.SessionSnapshot, pb.SessionSnapshot.FromString(snapshot))
        req = pb.CreateSessionRequest(model=snapshot.model, snapshot=snapshot, ttl_s=ttl_s)
        info = self._call(self.stub.CreateSession, req)
        return Session(self, info.session_id, info.model, position=snapshot.steps)

    def fork(self, session_id: str, ttl_s: float | None = None) -> Session:
        """A new session with a copy of ``session_id``'s state."""
        req = pb.ForkSessionRequest(session_id=session_id, ttl_s=ttl_s)
        info = self._call(self.stub.ForkSession, req)
        return Session(self, info.session_id, info.model)

    def close_session(self, session_id: str) -> None:
        self._call(self.stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))

    def reset_session(self, session_id: str) -> None:
        self._call(self.stub.ResetSession, pb.ResetSessionRequest(session_id=session_id))

    def session(
        self,
        model: str,
        initial_state: Mapping[str, np.ndarray] | None = None,
        ttl_s: float | None = None,
    ) -> Session:
        """A new session; use it in ``with`` so it is closed on exit."""
        info = self.create_session(model, initial_state, ttl_s)
        return Session(self, info.session_id, model, position=0)

    def resume(self, session_id: str, model: str, position: int | None = None) -> Session:
        """A handle on an existing session (e.g. after a disconnect). ``position``: its
        steps so far, if known (enables deduplicated retries)."""
        return Session(self, session_id, model, position=position)

    def _request(self, model: str, session_id: str, request_id: int, chunk: Chunk, position=None):
        req = pb.StreamRequest(session_id=session_id, request_id=request_id, position=position)
        _fill(req, self.model(model), chunk, batched=False)
        return req

    def stream(
        self, session_id: str, model: str, chunks: Iterable[Chunk], first_id: int = 0
    ) -> Iterator[StepOutput]:
        """Send every chunk over one Stream call (pipelined); yield the outputs in order."""
        reqs = (self._request(model, session_id, first_id + i, c) for i, c in enumerate(chunks))
        try:
            for resp in self.stub.Stream(reqs, metadata=self._metadata):
                yield _step_output(resp)
        except grpc.RpcError as err:
            raise RpcError.wrap(err) from None

    def step_many(
        self,
        chunks: Mapping[str, Chunk],
        *,
        model: str | None = None,
        positions: Mapping[str, int] | None = None,
    ) -> dict[str, StepOutput]:
        """One chunk for each of many sessions in one StepMany message: ``{session_id:
        chunk}`` -> ``{session_id: StepOutput}``. Sessions made or resumed by this client are
        known by model; others need ``model=`` (all of that model). A chunk that fails raises
        ``client_many.StepManyError`` carrying the others' outputs and each failure; see
        ``rnnzoo.client_many`` for retries and positions."""
        from .client_many import ManyStepper

        if self._many is None:
            self._many = ManyStepper(self)
        models = self._session_models
        if model is not None:
            models = {**models, **{sid: model for sid in chunks if sid not in models}}
        return self._many.step(chunks, models, positions)

    # ---- whole sequences and text ----------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Chunk | None = None,
        *,
        session_id: str | None = None,
        advance: bool = False,
    ) -> dict[str, np.ndarray]:
        """Whole-sequence inference: inputs WITH the batch axis (B, T, ...), or text."""
        req = pb.InferRequest(model=model, session_id=session_id or "", advance=advance)
        _fill(req, self.model(model), inputs, batched=True)
        return from_tensors(self._call(self.stub.Infer, req).outputs, what="output")

    def generate(
        self,
        model: str,
        prompt: str,
        max_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as the server produces them."""
        req = pb.GenerateRequest(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )
        try:
            for resp in self.stub.Generate(req, metadata=self._metadata):
                yield resp.text
        except grpc.RpcError as err:
            raise RpcError.wrap(err) from None


class Session:
    """One server-side session. ``step`` runs over one long-lived Stream call."""

    def __init__(
        self, client: Client, session_id: str, model: str, position: int | None = None
    ) -> None:
        self.client, self.id, self.model = client, session_id, model
        client._session_models[session_id] = model
        self.position = position  # steps applied, as the last response said (None: unknown)
        self._queue: queue.Queue | None = None
        self._responses: Any = None  # the open Stream call (grpc's, untyped)
        self._next_id = 0
        self._lock = threading.Lock()  # one step at a time: responses pair with requests
        self.retries = 0  # chunks resent after a failed call (for tests and logs)
        self.failures: list[str] = []  # the statuses those calls failed with

    def step(self, x: Chunk) -> StepOutput:
        """Send one chunk (a single step, or T steps) and wait for its outputs. With a known
        position, a call that fails with a retryable status is reopened and the chunk resent
        (deduplicated by the server) until ``client.retry_s`` runs out."""
        with self._lock:
            req = self.client._request(self.model, self.id, self._next_id, x, self.position)
            self._next_id += 1
            deadline, delay, failing_over = time.monotonic() + self.client.retry_s, 0.05, False
            while True:
                try:
                    out = self._send(req)
                except grpc.RpcError as err:
                    self._queue = self._responses = None  # that call is over; reopen
                    if (
                        self.position is None
                        or not _retryable(err, failing_over)
                        or time.monotonic() + delay > deadline
                    ):
                        raise RpcError.wrap(err) from None
                    failing_over = True
                    self.retries += 1
                    self.failures.append(err.code().name)
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                if self.position is not None:
                    self.position = out.steps_total
                return out

    def _send(self, req) -> StepOutput:
        if self._responses is None:
            self._queue = queue.Queue()
            self._responses = self.client.stub.Stream(
                iter(self._queue.get, _END), metadata=self.client._metadata
            )
        assert self._queue is not None  # opened with the responses
        self._queue.put(req)
        responses, limit = self._responses, self.client.step_timeout
        if limit is None:
            return _step_output(next(responses))
        ticket = self.client._watchdog.arm(limit, responses.cancel)
        try:
            resp = next(responses)
        except grpc.RpcError:
            if self.client._watchdog.disarm(ticket):
                raise RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no answer to this step within {limit:g} s (the per-step deadline, "
                    "Client(step_timeout=...)); its call was cancelled. Whether the server "
                    "applied it is unknown: resend it with its position "
                    f"({self.position if self.position is not None else 'unknown'})",
                ) from None
            raise
        if self.client._watchdog.disarm(ticket):  # answered just as the deadline fired
            self._queue = self._responses = None
        return _step_output(resp)

    def snapshot(self) -> pb.SessionSnapshot:
        return self.client.snapshot(self.id)

    def fork(self) -> Session:
        forked = self.client.fork(self.id)
        forked.position = self.position
        return forked

    def stream(self, chunks: Iterable[Chunk]) -> Iterator[StepOutput]:
        """Pipeline many chunks over one Stream call; yields outputs in order."""
        self.detach()
        first, self._next_id = self._next_id, self._next_id + 1_000_000_000
        known, self.position = self.position is not None, None  # unknown if it fails midway
        for out in self.client.stream(self.id, self.model, chunks, first_id=first):
            if known:
                self.position = out.steps_total
            yield out

    def detach(self) -> None:
        """End this handle's Stream call; the session lives on and can be resumed."""
        with self._lock:
            if self._responses is None:
                return
            assert self._queue is not None  # opened with the responses
            self._queue.put(_END)
            try:
                for _ in self._responses:  # drain: the server detaches before it ends the call
                    pass
            except grpc.RpcError:
                pass  # already failed: nothing attached any more
            self._queue = self._responses = None

    def reset(self) -> None:
        self.client.reset_session(self.id)
        self.position = 0

    def close(self) -> None:
        self.detach()
        self.client.close_session(self.id)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- helpers -------------------------------------------------------------------------------
def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None


def _fill(req, info: pb.ModelInfo, data: Chunk | None, *, batched: bool) -> None:
    """Put ``data`` into ``req``: text, named tensors, or one array for the single input."""
    if isinstance(data, str):
        req.text = data
        return
    if data is None:
        raise InvalidArgument(f"no inputs given for model {info.name!r}")
    if isinstance(data, Mapping):
        arrays = dict(data)
    else:
        inputs = info.graphs[0].inputs if info.graphs else []
        if len(inputs) != 1:
            raise InvalidArgument(
                f"model {info.name!r} takes inputs {[i.name for i in inputs]}: pass a dict"
            )
        a = np.asarray(data)
        if not batched and a.ndim == len(inputs[0].shape) - 2:
            a = a[None]  # one step without its time axis, e.g. (F,) -> (1, F)
        arrays = {inputs[0].name: a}
    for name, tensor in to_tensors(arrays).items():
        req.inputs[name].CopyFrom(tensor)
