"""The transport limit: an rnnzoo.v1 server that does no inference.

Same proto, same ``Stream`` RPC, same grpc.aio server setup (message-size options) as the
rnnzoo server; each response carries an output tensor of the size the real model would
return, so both servers move the same bytes. What is left is the cost of gRPC + protobuf
+ the asyncio loop per message: no server can do a closed-loop step faster than this.

Run as ``python -m rnnzoo.benchmarks.echo_server --port 0 --output-features F``; it prints
``listening on HOST:PORT`` once it answers, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal

import grpc

from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc

MB = 1 << 20


class EchoServicer(pb_grpc.RnnzooServicer):
    """CreateSession/CloseSession and Stream; Stream answers each chunk with a same-size y."""

    def __init__(self, output_name: str, output_features: int) -> None:
        self.output_name = output_name
        self.output_features = output_features

    async def CreateSession(self, request, context):
        return pb.Session(session_id=secrets.token_urlsafe(16), model=request.model)

    async def CloseSession(self, request, context):
        return pb.CloseSessionResponse()

    async def Stream(self, request_iterator, context):
        steps: dict[str, int] = {}
        async for req in request_iterator:
            x = next(iter(req.inputs.values()))  # (T, F_in) of one sequence
            T = x.shape[0] if x.shape else 1
            start = steps.get(req.session_id, 0)
            steps[req.session_id] = start + T
            # (T, F_out) float32 zeros: the bytes a real model's y would take on the wire.
            y = pb.Tensor(
                dtype="float32",
                shape=[T, self.output_features],
                data=bytes(4 * T * self.output_features),
            )
            yield pb.StreamResponse(
                request_id=req.request_id,
                session_id=req.session_id,
                outputs={self.output_name: y},
                start=start,
                steps_total=start + T,
            )


async def serve(host: str, port: int, output_name: str, output_features: int) -> None:
    await serve_servicer(EchoServicer(output_name, output_features), host, port)


async def serve_servicer(servicer: pb_grpc.RnnzooServicer, host: str, port: int) -> None:
    """Serve ``servicer`` with the rnnzoo server's message limits until SIGTERM/SIGINT,
    printing ``listening on HOST:PORT`` once it answers (the bench's reference servers)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 16 * MB),
            ("grpc.max_send_message_length", 16 * MB),
        ]
    )
    pb_grpc.add_RnnzooServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--output-name", default="y")
    p.add_argument("--output-features", type=int, default=1)
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.output_name, args.output_features))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
