"""What a client call returns or raises, and which failures the clients resend.

Shared by ``rnnzoo.client`` (Stream, Infer) and ``rnnzoo.client_many`` (StepMany), so that
neither imports the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from rnnzoo.proto.tensors import from_tensors
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb


class RpcError(grpc.RpcError):
    """A failed call: ``code()`` is the server's status code, ``details()`` its message."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: int | None = None):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self.request_id = code, details, request_id

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    @classmethod
    def wrap(cls, err: grpc.RpcError) -> RpcError:
        if isinstance(err, RpcError):
            return err
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        meta = dict(err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else {}
        rid = meta.get("rnnzoo-request-id")
        return cls(code, details or "", int(rid) if rid is not None else None)


@dataclass(frozen=True)
class StepOutput:
    outputs: dict[str, np.ndarray]  # no batch axis: (T, ...)
    start: int  # index of the first returned step in the session's sequence
    steps_total: int
    revised: bool  # True: outputs re-cover the whole sequence so far (non-streamable models)
    request_id: int

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]

    @property
    def value(self) -> np.ndarray:
        """The first output (most models have one)."""
        return next(iter(self.outputs.values()))


# Statuses after which a chunk is resent (see the module docstring).
RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # the per-step deadline: a frozen server
    grpc.StatusCode.ABORTED,  # the outcome was not settled: resent with its position
)


def _retryable(err: grpc.RpcError, failing_over: bool) -> bool:
    code = err.code()
    if code in RETRY_CODES:
        return True
    # the dead replica's lease: it runs out by itself
    return (
        failing_over
        and code == grpc.StatusCode.FAILED_PRECONDITION
        and ("lease runs out" in (err.details() or ""))
    )


def _step_output(resp: pb.StreamResponse) -> StepOutput:
    return StepOutput(
        outputs=from_tensors(resp.outputs, what="output"),
        start=resp.start,
        steps_total=resp.steps_total,
        revised=resp.revised,
        request_id=resp.request_id,
    )
