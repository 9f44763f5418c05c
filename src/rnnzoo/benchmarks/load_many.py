"""Closed-loop load over StepMany: N sessions stepped by ONE call, one message per round that
carries a chunk for every session; the next message only after the last answer.

The same cell shape as ``load.run_cell`` (sessions created first, not timed; only round trips
that start and end inside the measuring window count) so the two paths compare side by side:
steps/s are session-steps (sessions x steps per chunk x messages / window), latency is a
message's round trip (every session's step in it), CPU is per session-step.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc

from .load import MB, CellResult, _chunk, _cpu_s, _own_cpu_s


async def run_many_cell(
    target: str,
    model: str,
    sessions: int,
    steps: int,
    *,
    input_name: str = "x",
    features: int = 1,
    warmup_s: float = 0.5,
    duration_s: float = 2.0,
    max_messages: int = 2_000_000,
    server_pid: int | None = None,
) -> CellResult:
    """``CellResult`` with ``messages`` = StepMany messages and the CPU figures per
    session-step (``server_cpu_us_per_msg`` / ``client_cpu_us_per_msg`` hold them here: one
    session-step is what one Stream message carries at the same ``steps``)."""
    assert sessions >= 1 and steps >= 1 and duration_s > 0
    opts = [("grpc.max_receive_message_length", 64 * MB), ("grpc.max_send_message_length", 64 * MB)]
    async with grpc.aio.insecure_channel(target, options=opts) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.RnnzooStub(channel)
        ids = [
            (await stub.CreateSession(pb.CreateSessionRequest(model=model))).session_id
            for _ in range(sessions)
        ]
        msg = pb.StepManyRequest(
            chunks=[
                pb.StreamRequest(session_id=sid, inputs={input_name: _chunk(steps, features, i)})
                for i, sid in enumerate(ids)
            ]
        )
        rtts: list[tuple[float, float]] = []
        cpu: dict[str, tuple] = {}
        t_start = time.perf_counter() + warmup_s
        t_end = t_start + duration_s
        call = stub.StepMany()
        n = 0
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end or len(rtts) >= max_messages:
                    break
                if t0 >= t_start and "start" not in cpu:
                    cpu["start"] = (t0, _cpu_s(server_pid), _own_cpu_s())
                n += 1
                for i, c in enumerate(msg.chunks):
                    c.request_id = n * sessions + i
                await call.write(msg)
                resp = await call.read()
                t1 = time.perf_counter()
                if resp is grpc.aio.EOF:
                    raise RuntimeError("the server ended the StepMany call early")
                failed = [r for r in resp.results if r.HasField("error")]
                if failed:
                    raise RuntimeError(f"a StepMany chunk failed: {failed[0].error.message}")
                assert len(resp.results) == sessions
                if t0 >= t_start:
                    rtts.append((t1, t1 - t0))
            cpu["end"] = (time.perf_counter(), _cpu_s(server_pid), _own_cpu_s())
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        finally:
            call.cancel()
            for sid in ids:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    if not rtts or "start" not in cpu:
        raise RuntimeError(
            f"no StepMany round trip completed inside the {duration_s:.2f} s window "
            f"({sessions} sessions, {steps} steps/chunk): raise the duration"
        )
    (w0, s0, c0), (w1, s1, c1) = cpu["start"], cpu["end"]
    window = w1 - w0
    done = len(rtts)
    session_steps = done * sessions  # Stream-message equivalents
    lat = np.asarray([r for _, r in rtts]) * 1e3
    server_cpu = None if s0 is None or s1 is None else (s1 - s0) / session_steps * 1e6
    return CellResult(
        sessions=sessions,
        steps=steps,
        messages=done,
        window_s=round(window, 4),
        steps_per_s=session_steps * steps / window,
        msgs_per_s=done / window,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        server_cpu_us_per_msg=server_cpu,
        client_cpu_us_per_msg=(c1 - c0) / session_steps * 1e6,
    )
