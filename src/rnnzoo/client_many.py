"""``Client.step_many``: one StepMany message steps many sessions at once.

    outs = client.step_many({sid_a: x_a, sid_b: x_b})   # {session_id: StepOutput}
    outs[sid_a]["y"]

One StepMany call is kept open per client and reused (one request message, one response
message at a time). Each chunk carries the session's position when this client knows it (the
steps_total of the session's last StepMany result here, or ``positions=``): when the call
fails with a status in ``client_results.RETRY_CODES`` the whole message is resent on a new call, and
the server answers the chunks it already applied with their stored responses, so no step is
applied twice. A session stepped through ``step_many`` should be stepped only through it (or
its position passed in ``positions=``): a chunk whose position does not match is refused.

A chunk that fails does not fail the others: ``step_many`` then raises ``StepManyError``,
which carries the outputs of the chunks that were applied (``.outputs``) and each failed
chunk's error (``.errors``, ``RpcError`` with the server's code and message).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Mapping

import grpc

from rnnzoo.client_results import RpcError, StepOutput, _retryable, _step_output
from rnnzoo.errors import InvalidArgument
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb

_END = object()
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class StepManyError(RpcError):
    """Some chunks of a StepMany message failed. ``outputs``: the chunks that were applied,
    by session; ``errors``: each failed chunk's error, by session. ``code()``/``details()``
    are the first failed chunk's."""

    def __init__(self, outputs: dict[str, StepOutput], errors: dict[str, RpcError]):
        first = next(iter(errors.values()))
        n = len(errors)
        super().__init__(
            first.code(),
            f"{n} of {n + len(outputs)} chunks failed; the first: {first.details()}",
        )
        self.outputs, self.errors = outputs, errors


def chunk_error(err: pb.ChunkError, request_id: int) -> RpcError:
    """A failed chunk's error as an RpcError with the server's code and message."""
    return RpcError(_CODES.get(err.code, grpc.StatusCode.UNKNOWN), err.message, request_id)


class ManyStepper:
    """The open StepMany call of one client, and the positions it learned."""

    def __init__(self, client) -> None:
        self.client = client
        self.positions: dict[str, int] = {}  # session -> steps applied, from its last result
        self._queue: queue.Queue | None = None
        self._responses: Iterator[pb.StepManyResponse] | None = None
        self._lock = threading.Lock()
        self._next_id = 0
        self.retries = 0  # messages resent after a failed call (for tests and logs)

    def request(
        self,
        chunks: Mapping[str, object],
        models: Mapping[str, str],
        positions: Mapping[str, int] | None,
    ) -> pb.StepManyRequest:
        msg = pb.StepManyRequest()
        for sid, chunk in chunks.items():
            model = models.get(sid)
            if model is None:
                raise InvalidArgument(
                    f"step_many does not know the model of session {sid[:8]}...: create it "
                    "with this client, or pass model= (all sessions of one model) or models="
                )
            pos = positions.get(sid) if positions is not None else None
            if pos is None:
                pos = self.positions.get(sid)
            self._next_id += 1
            msg.chunks.append(self.client._request(model, sid, self._next_id, chunk, pos))
        return msg

    def send(self, msg: pb.StepManyRequest) -> pb.StepManyResponse:
        """One message, resent on a new call after a retryable failure (within retry_s)."""
        with self._lock:
            known = all(c.HasField("position") for c in msg.chunks)
            deadline, delay = time.monotonic() + self.client.retry_s, 0.05
            while True:
                try:
                    return self._send(msg)
                except grpc.RpcError as err:
                    self._queue = self._responses = None  # that call is over; reopen
                    if (
                        not known
                        or not _retryable(err, True)
                        or time.monotonic() + delay > deadline
                    ):
                        raise
                    self.retries += 1
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)

    def _send(self, msg: pb.StepManyRequest) -> pb.StepManyResponse:
        if self._responses is None:
            self._queue = queue.Queue()
            self._responses = self.client.stub.StepMany(
                iter(self._queue.get, _END), metadata=self.client._metadata
            )
        assert self._queue is not None  # opened with the responses
        self._queue.put(msg)
        return next(self._responses)

    def close(self) -> None:
        """End the open call (the server detaches its sessions; they live on)."""
        with self._lock:
            if self._responses is None:
                return
            assert self._queue is not None  # opened with the responses
            self._queue.put(_END)
            try:
                for _ in self._responses:
                    pass
            except grpc.RpcError:
                pass
            self._queue = self._responses = None

    def step(
        self,
        chunks: Mapping[str, object],
        models: Mapping[str, str],
        positions: Mapping[str, int] | None = None,
    ) -> dict[str, StepOutput]:
        """See ``Client.step_many``."""
        if not chunks:
            return {}
        msg = self.request(chunks, models, positions)
        try:
            resp = self.send(msg)
        except grpc.RpcError as err:
            raise RpcError.wrap(err) from None
        if len(resp.results) != len(msg.chunks):
            raise RpcError(
                grpc.StatusCode.INTERNAL,
                f"the server answered {len(resp.results)} results to {len(msg.chunks)} chunks",
            )
        outputs: dict[str, StepOutput] = {}
        errors: dict[str, RpcError] = {}
        for req, res in zip(msg.chunks, resp.results, strict=True):
            sid = req.session_id
            if res.HasField("error"):
                errors[sid] = chunk_error(res.error, req.request_id)
                self.positions.pop(sid, None)  # unknown until the user says (positions=)
                continue
            out = _step_output(res)
            outputs[sid] = out
            self.positions[sid] = out.steps_total
        if errors:
            raise StepManyError(outputs, errors)
        return outputs
