"""The least a Python gRPC server can do per streamed step: the floor under the lean path.

Same proto, ``Stream`` RPC and grpc.aio setup as the echo server (``echo_server.py``), plus
what any stateful server must do per message, and nothing else: decode the input tensor,
one ORT call (the direct call the server makes, ``rnnzoo.ort_options.run_fn``) with the
session's state kept in a dict, encode the output. No validation, limits, leases, batching,
interceptors, logging or metrics. Its steps/s at 1 session is what a Python grpc.aio server
running ORT per message reaches on the machine at hand; rnnzoo's lean path is judged
against it as well as against the echo round trip plus a cold ORT call (the bench's bound).

Run as ``python -m rnnzoo.benchmarks.minimal_server --model FILE.onnx --port 0``; prints
``listening on HOST:PORT`` once it answers, stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets

import numpy as np

from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc

from .echo_server import serve_servicer


class MinimalServicer(pb_grpc.RnnzooServicer):
    """CreateSession (zero state) and Stream: decode, one ORT call, encode."""

    def __init__(self, onnx_path: str) -> None:
        import onnxruntime as ort

        from rnnzoo.contract import read_contract
        from rnnzoo.ort_options import run_fn, session_options

        self.contract = read_contract(onnx_path)
        sess = ort.InferenceSession(
            onnx_path, session_options(1, 1), providers=["CPUExecutionProvider"]
        )
        self.run = run_fn(sess)
        (x,) = self.contract.inputs
        self.x_name = x.name
        self.out_name = self.contract.outputs[0].name
        self.fetch = [self.out_name] + [st.output for st in self.contract.states]
        self.zero = {st.input: np.zeros(_batch1(st), np.float32) for st in self.contract.states}
        self.states: dict[str, dict[str, np.ndarray]] = {}

    async def CreateSession(self, request, context):
        sid = secrets.token_urlsafe(16)
        self.states[sid] = dict(self.zero)
        return pb.Session(session_id=sid, model=request.model)

    async def CloseSession(self, request, context):
        self.states.pop(request.session_id, None)
        return pb.CloseSessionResponse()

    async def Stream(self, request_iterator, context):
        steps: dict[str, int] = {}
        async for req in request_iterator:
            t = req.inputs[self.x_name]  # (T, F) of one sequence
            x = np.frombuffer(t.data, np.float32).reshape(1, *t.shape)
            state = self.states[req.session_id]
            res = self.run(self.fetch, {self.x_name: x, **state})
            for st, r in zip(self.contract.states, res[1:], strict=True):
                state[st.input] = r
            y = res[0][0]
            start = steps.get(req.session_id, 0)
            steps[req.session_id] = start + x.shape[1]
            out = pb.Tensor(dtype="float32", shape=y.shape, data=y.tobytes())
            yield pb.StreamResponse(
                request_id=req.request_id,
                session_id=req.session_id,
                outputs={self.out_name: out},
                start=start,
                steps_total=start + x.shape[1],
            )


def _batch1(st) -> list[int]:
    """A state's shape at batch 1 (its other dims are fixed in an rnnzoo export)."""
    return [1 if i == st.batch_axis else d for i, d in enumerate(st.shape)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", required=True, help="an rnnzoo-exported .onnx (one input)")
    args = p.parse_args(argv)
    asyncio.run(serve_servicer(MinimalServicer(args.model), args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
