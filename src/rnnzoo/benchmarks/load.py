"""Closed-loop load: N sessions, one ``Stream`` each, next chunk only after the last answer.

One cell = (target, sessions, steps per message). Sessions are created first (not timed);
then every session streams for ``warmup_s + duration_s``; only round trips that START and END
inside the measuring window count, so throughput = steps completed in the window / window.
``max_messages`` bounds a cell on a fast machine. asyncio + grpc.aio, one process.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import grpc
import numpy as np

from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc

MB = 1 << 20


@dataclass
class CellResult:
    sessions: int
    steps: int  # steps per message (T of each chunk)
    messages: int  # round trips completed inside the window
    window_s: float
    steps_per_s: float
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    # CPU time per message in the window (user+sys, microseconds): where the cores went.
    server_cpu_us_per_msg: float | None
    client_cpu_us_per_msg: float

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _cpu_s(pid: int | None) -> float | None:
    """user+sys CPU seconds of ``pid`` (all threads) from /proc; None if not readable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _chunk(steps: int, features: int, seed: int) -> pb.Tensor:
    x = np.random.default_rng(seed).standard_normal((steps, features)).astype(np.float32)
    return pb.Tensor(dtype="float32", shape=[steps, features], data=x.tobytes())


async def _session_loop(
    stub,
    session_id: str,
    chunk: pb.Tensor,
    input_name: str,
    t_start: float,
    t_end: float,
    cap: int,
    rtts: list[tuple[float, float]],
    stop: dict,
) -> None:
    """Stream until t_end (or the cap); append (end time, RTT) of trips starting >= t_start."""
    call = stub.Stream()
    req = pb.StreamRequest(session_id=session_id, inputs={input_name: chunk})
    n = 0
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end or stop.get("capped_at") is not None:
                break
            if len(rtts) >= cap:
                stop["capped_at"] = t0
                break
            n += 1
            req.request_id = n
            await call.write(req)
            resp = await call.read()
            t1 = time.perf_counter()
            if resp is grpc.aio.EOF:
                raise RuntimeError(f"server ended the stream of session {session_id} early")
            assert resp.request_id == n, (resp.request_id, n)  # one answer per chunk, in order
            if t0 >= t_start:
                rtts.append((t1, t1 - t0))
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:  # drain: a clean end of stream
            pass
    finally:
        call.cancel()


async def run_cell(
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
    connections: int = 1,
) -> CellResult:
    """``connections``: channels, each with its own subchannel pool (a connection of its
    own); sessions are spread over them round robin (a server with several workers balances
    connections, not calls)."""
    assert sessions >= 1 and steps >= 1 and duration_s > 0
    opts = [("grpc.max_receive_message_length", 16 * MB), ("grpc.max_send_message_length", 16 * MB)]
    if connections > 1:
        opts.append(("grpc.use_local_subchannel_pool", 1))
    extra = [grpc.aio.insecure_channel(target, options=opts) for _ in range(connections - 1)]
    async with grpc.aio.insecure_channel(target, options=opts) as channel:
        channels = [channel, *extra]
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 30)
        stubs = [pb_grpc.RnnzooStub(ch) for ch in channels]
        stub = stubs[0]
        ids = [
            (await stub.CreateSession(pb.CreateSessionRequest(model=model))).session_id
            for _ in range(sessions)
        ]
        chunks = [_chunk(steps, features, seed=i) for i in range(sessions)]
        rtts: list[tuple[float, float]] = []
        stop: dict = {}
        t_start = time.perf_counter() + warmup_s
        t_end = t_start + duration_s
        cpu: dict[str, tuple] = {}
        loop = asyncio.get_running_loop()
        to_loop = loop.time() - time.perf_counter()  # perf_counter -> loop clock

        def mark(k: str) -> None:
            cpu[k] = (time.perf_counter(), _cpu_s(server_pid), _own_cpu_s())

        for key, when in (("start", t_start), ("end", t_end)):
            loop.call_at(when + to_loop, mark, key)
        try:
            await asyncio.gather(
                *(
                    _session_loop(
                        stubs[i % len(stubs)],
                        sid,
                        c,
                        input_name,
                        t_start,
                        t_end,
                        max_messages,
                        rtts,
                        stop,
                    )
                    for i, (sid, c) in enumerate(zip(ids, chunks, strict=True))
                )
            )
        finally:
            for sid in ids:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
            for ch in extra:
                await ch.close()
    # A capped cell ends when the cap was hit; trips still in flight then do not count.
    window_end = min(t_end, stop.get("capped_at") or t_end)
    window = window_end - t_start
    done = [rtt for t1, rtt in rtts if t1 <= window_end]
    if not done:
        raise RuntimeError(
            f"no round trip completed inside the {window:.2f} s window "
            f"({sessions} sessions, {steps} steps/message): raise the duration"
        )
    lat = np.asarray(done) * 1e3
    server_cpu = client_cpu = None
    if "start" in cpu and "end" in cpu:
        (_, s0, c0), (_, s1, c1) = cpu["start"], cpu["end"]
        client_cpu = (c1 - c0) / len(done) * 1e6
        if s0 is not None and s1 is not None:
            server_cpu = (s1 - s0) / len(done) * 1e6
    return CellResult(
        sessions=sessions,
        steps=steps,
        messages=len(done),
        window_s=round(window, 4),
        steps_per_s=len(done) * steps / window,
        msgs_per_s=len(done) / window,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        server_cpu_us_per_msg=server_cpu,
        client_cpu_us_per_msg=client_cpu if client_cpu is not None else float("nan"),
    )
