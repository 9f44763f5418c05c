"""The documented long run of issue 11 (docs/reliability.md): memory, fuzz and soak against a
real ``rnnzoo serve`` process, with its RSS sampled from /proc.

    python tests/soak_harness.py memory [--env MALLOC_ARENA_MAX=2] [--trim]
    python tests/soak_harness.py fuzz --requests 10000
    python tests/soak_harness.py soak --sessions 1000 --seconds 60

- memory: Infers of the largest output the limits allow (max_output_bytes of logits), 4 at
  once, several rounds; RSS before, peak, after (and after an idle pause);
- fuzz: ``fuzz_harness.fuzz`` (hostile requests on every RPC, canaries vs offline replay);
- soak: N sessions each streaming 1-step chunks over its own Stream for S seconds (closed
  loop), then every session's outputs checked against a stateless Infer of its whole input
  (the offline replay); status histogram, p50/p99, RSS.

Prints one JSON object. Models: the test zoo (``onnx_fixtures.build_zoo``) in a temp folder.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from onnx_fixtures import CHARS, build_zoo

from rnnzoo.benchmarks.servers import ServerProcess
from rnnzoo.proto.tensors import from_tensor, to_tensor
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc

MB = 1 << 20


class Rss:
    """Samples a process's VmRSS every ``interval_s`` in a thread; keeps the peak."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid, self.interval = pid, interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self) -> Rss:
        self.peak = self.now()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def _mb(n: int) -> float:
    return round(n / MB, 1)


def serve(model_dir: Path, env: dict[str, str], extra: list[str]) -> ServerProcess:
    cmd = [
        sys.executable,
        "-m",
        "rnnzoo.cli",
        "serve",
        "--model-dir",
        str(model_dir),
        "--port",
        "0",
        "--log-level",
        "warning",
        *extra,
    ]
    for k, v in env.items():
        os.environ[k] = v  # ServerProcess copies os.environ
    return ServerProcess(cmd, "rnnzoo")


def _channel(target: str) -> grpc.aio.Channel:
    big = 64 << 20
    return grpc.aio.insecure_channel(
        target,
        options=[("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)],
    )


# ---- memory ---------------------------------------------------------------------------------------
async def memory(target: str, rss: Rss, rounds: int = 5, concurrent: int = 4) -> dict:
    async with _channel(target) as ch:
        stub = pb_grpc.RnnzooStub(ch)
        fit = None
        try:
            await stub.Infer(
                pb.InferRequest(model="charlm", tokens=pb.TokenIds(ids=[5] * 5 * 10**6))
            )
        except grpc.aio.AioRpcError as err:
            fit = int(err.details().split("send at most ")[1].split()[0])
        steps = fit or 10**5
        req = pb.InferRequest(model="charlm", tokens=pb.TokenIds(ids=[5] * steps))
        await stub.Infer(pb.InferRequest(model="charlm", tokens=pb.TokenIds(ids=[5] * 100)))
        await asyncio.sleep(1.0)
        before = rss.now()
        rss.peak = before
        t0 = time.perf_counter()
        codes = collections.Counter()
        for _ in range(rounds):
            res = await asyncio.gather(
                *(stub.Infer(req, timeout=300) for _ in range(concurrent)), return_exceptions=True
            )
            for r in res:
                codes[r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK"] += 1
        seconds = time.perf_counter() - t0
        after = rss.now()
        await asyncio.sleep(5.0)
        idle = rss.now()
    return {
        "request": f"Infer(charlm, {steps} tokens) -> {steps * len(CHARS) * 4 / MB:.1f} MB of logits",
        "rounds": rounds,
        "concurrent": concurrent,
        "codes": dict(codes),
        "seconds": round(seconds, 2),
        "rss_before_mb": _mb(before),
        "rss_peak_mb": _mb(rss.peak),
        "rss_after_mb": _mb(after),
        "rss_after_5s_idle_mb": _mb(idle),
    }


# ---- soak -----------------------------------------------------------------------------------------
async def soak(target: str, rss: Rss, sessions: int, seconds: float) -> dict:
    async with _channel(target) as ch:
        stub = pb_grpc.RnnzooStub(ch)
        before = rss.now()
        rss.peak = before
        sids = []
        for i in range(0, sessions, 200):
            got = await asyncio.gather(
                *(
                    stub.CreateSession(pb.CreateSessionRequest(model="gru"))
                    for _ in range(min(200, sessions - i))
                )
            )
            sids += [s.session_id for s in got]
        codes: collections.Counter = collections.Counter()
        rtts: list[float] = []
        sent: dict[str, list[np.ndarray]] = {s: [] for s in sids}
        got_y: dict[str, list[np.ndarray]] = {s: [] for s in sids}
        t_end = time.perf_counter() + seconds

        async def one(k: int, sid: str) -> None:
            rng = np.random.default_rng(k)
            call = stub.Stream()
            try:
                while time.perf_counter() < t_end:
                    x = rng.normal(size=(1, 3)).astype(np.float32)
                    t0 = time.perf_counter()
                    await call.write(pb.StreamRequest(session_id=sid, inputs={"x": to_tensor(x)}))
                    resp = await call.read()
                    rtts.append(time.perf_counter() - t0)
                    sent[sid].append(x)
                    got_y[sid].append(from_tensor(resp.outputs["y"]))
                    codes["OK"] += 1
                await call.done_writing()
                await call.read()
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(k, s) for k, s in enumerate(sids)))
        wall = time.perf_counter() - t0
        during_peak = rss.peak
        worst, checked = 0.0, 0
        for sid in sids:  # the offline replay: stateless Infer of each whole sequence
            if not sent[sid]:
                continue
            x = np.concatenate(sent[sid])
            want = from_tensor(
                (
                    await stub.Infer(pb.InferRequest(model="gru", inputs={"x": to_tensor(x[None])}))
                ).outputs["y"]
            )[0]
            worst = max(worst, float(np.max(np.abs(np.concatenate(got_y[sid]) - want))))
            checked += 1
        for i in range(0, len(sids), 200):
            await asyncio.gather(
                *(
                    stub.CloseSession(pb.CloseSessionRequest(session_id=s))
                    for s in sids[i : i + 200]
                )
            )
        await asyncio.sleep(2.0)
        after = rss.now()
    ms = np.array(rtts) * 1e3
    return {
        "sessions": sessions,
        "seconds": seconds,
        "wall_s": round(wall, 1),
        "messages": len(ms),
        "msgs_per_s": round(len(ms) / wall, 1),
        "codes": dict(codes),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "replay_checked_sessions": checked,
        "replay_max_abs_error": worst,
        "rss_before_mb": _mb(before),
        "rss_peak_mb": _mb(during_peak),
        "rss_after_close_mb": _mb(after),
    }


async def fuzz_run(target: str, rss: Rss, n: int, seed: int) -> dict:
    from fuzz_harness import fuzz

    before = rss.now()
    rss.peak = before
    t0 = time.perf_counter()
    report = await fuzz(target, n, seed=seed, rounds=20, concurrency=16)
    out = report.summary()
    out.pop("by_rpc")
    out.update(
        seconds=round(time.perf_counter() - t0, 1),
        rss_before_mb=_mb(before),
        rss_peak_mb=_mb(rss.peak),
        rss_after_mb=_mb(rss.now()),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("memory", "fuzz", "soak"))
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    p.add_argument("--serve-arg", action="append", default=[], help="extra rnnzoo serve args")
    args = p.parse_args(argv)
    env = dict(e.split("=", 1) for e in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        build_zoo(Path(tmp))
        with serve(Path(tmp), env, args.serve_arg) as srv, Rss(srv.proc.pid) as rss:
            start = rss.now()
            if args.phase == "memory":
                out = asyncio.run(memory(srv.target, rss))
            elif args.phase == "fuzz":
                out = asyncio.run(fuzz_run(srv.target, rss, args.requests, args.seed))
            else:
                out = asyncio.run(soak(srv.target, rss, args.sessions, args.seconds))
            out = {
                "phase": args.phase,
                "env": env,
                "serve_args": args.serve_arg,
                "rss_at_start_mb": _mb(start),
                **out,
            }
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
