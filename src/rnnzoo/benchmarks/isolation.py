"""Isolation benchmark (issue 11): does a heavy client stall a light one?

A light client streams 1-step chunks to a one-way model (closed loop: next chunk after the
answer) and records each round trip. It is measured alone, then while a heavy client runs:

- ``bidir``: a bidirectional session past 9,000 buffered steps, fed 1-step chunks, so every
  chunk recomputes the whole prefix (a new session is started when it nears the buffer limit);
- ``infer``: two concurrent 100,000-step Infers on the one-way model, back to back.

Server, light client and heavy client are separate processes (no shared GIL). Printed: the
light client's p50/p99 unloaded and loaded and the p99 ratio (target: within 2x), and how much
work the heavy client got done meanwhile (isolation must not be bought by starving it).
``--baseline`` also runs each scenario against a server with the long-job pool switched off
(``--long-job-steps`` above any request: long work on the loop / in the shared executor, as
before issue 11), for comparison.

    python -m rnnzoo.benchmarks.isolation [--scenarios bidir,infer] [--duration 10] [--baseline]
    rnnzoo bench --isolation [...]        (the same)

Needs torch (the models are exported from random-weight rnnzoo nets, like ``rnnzoo bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .servers import ServerProcess

UNI, BI = "iso_uni", "iso_bi"
BIDIR_FILL = 9_000  # buffered steps before the heavy bidirectional client streams 1-step chunks
BIDIR_MAX = 9_990  # start over below --max-buffer-steps (10,000)
INFER_STEPS = 100_000
_END = object()


def build_models(model_dir: Path, hidden: int = 128) -> None:
    """A one-way GRU forecaster (H=128) and a bidirectional GRU tagger (H=64, random
    weights, seeded): its 9,000-step prefix costs tens of ms, like the issue's."""
    import torch

    from rnnzoo.export.onnx_export import export_model
    from rnnzoo.models.rnn import RecurrentNet, RNNConfig

    torch.manual_seed(0)
    uni = RecurrentNet(RNNConfig("gru", hidden, input_size=1, output_size=1)).eval()
    export_model(uni, model_dir / f"{UNI}.onnx", name=UNI, task={"kind": "forecast"})
    cfg = RNNConfig("gru", hidden // 2, bidirectional=True, input_size=1, output_size=1)
    bi = RecurrentNet(cfg).eval()
    export_model(bi, model_dir / f"{BI}.onnx", name=BI, task={"kind": "tag"})


def server(model_dir: Path, pool: bool, nice: int = 10) -> ServerProcess:
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
        "--session-ttl",
        "0",
    ]
    if not pool:
        cmd += ["--long-job-steps", str(10**9)]  # nothing is "long": the pre-issue-11 paths
    cmd += ["--long-nice", str(nice)]
    return ServerProcess(cmd, f"rnnzoo(long-job pool {'on' if pool else 'off'})")


def _tensor(x: np.ndarray):
    from rnnzoo.proto.tensors import to_tensor

    return to_tensor(np.ascontiguousarray(x, np.float32))


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ---- the light client ------------------------------------------------------------------------
def light(target: str, duration_s: float, warmup_s: float = 1.0) -> dict:
    """1-step chunks over one Stream for warmup + duration; RTT percentiles in ms."""
    import grpc

    from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
    from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RnnzooStub(ch)
        sid = stub.CreateSession(pb.CreateSessionRequest(model=UNI)).session_id
        q: queue.Queue = queue.Queue()
        responses = stub.Stream(iter(q.get, _END))
        x = _tensor(np.zeros((1, 1)))
        rtts: list[float] = []
        t_start = time.perf_counter()
        t_measure, t_end = t_start + warmup_s, t_start + warmup_s + duration_s
        try:
            while (t0 := time.perf_counter()) < t_end:
                q.put(pb.StreamRequest(session_id=sid, inputs={"x": x}))
                next(responses)
                if t0 >= t_measure:
                    rtts.append(time.perf_counter() - t0)
        finally:
            q.put(_END)
            for _ in responses:
                pass
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    ms = np.array(rtts) * 1e3
    return {
        "messages": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


# ---- the heavy client (its own process) ---------------------------------------------------------
def heavy(target: str, scenario: str, progress: Path) -> None:
    """Run ``scenario`` until killed; print "ready" once loaded; append a line to
    ``progress`` per completed heavy request."""
    import grpc

    from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
    from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc

    out = progress.open("a", buffering=1)
    ch = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = pb_grpc.RnnzooStub(ch)
    if scenario == "infer":
        x = _tensor(np.random.default_rng(0).normal(size=(1, INFER_STEPS, 1)))

        def loop() -> None:
            while True:
                stub.Infer(pb.InferRequest(model=UNI, inputs={"x": x}), timeout=600)
                out.write("infer\n")

        for _ in range(2):
            threading.Thread(target=loop, daemon=True).start()
        time.sleep(0.5)
        print("ready", flush=True)
        threading.Event().wait()
        return
    rng = np.random.default_rng(1)
    fill = _tensor(rng.normal(size=(BIDIR_FILL, 1)))
    one = _tensor(rng.normal(size=(1, 1)))
    ready = False
    while True:  # a session per pass: fill to 9,000 steps, then 1-step chunks to ~10,000
        sid = stub.CreateSession(pb.CreateSessionRequest(model=BI)).session_id
        q: queue.Queue = queue.Queue()
        responses = stub.Stream(iter(q.get, _END))
        q.put(pb.StreamRequest(session_id=sid, inputs={"x": fill}))
        total = next(responses).steps_total
        if not ready:
            print("ready", flush=True)
            ready = True
        while total < BIDIR_MAX:
            q.put(pb.StreamRequest(session_id=sid, inputs={"x": one}))
            total = next(responses).steps_total
            out.write("chunk\n")
        q.put(_END)
        for _ in responses:
            pass
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


class HeavyProcess:
    def __init__(self, target: str, scenario: str, workdir: Path) -> None:
        self.progress = workdir / f"heavy-{scenario}-{time.monotonic_ns()}.log"
        self.progress.touch()
        cmd = [
            sys.executable,
            "-m",
            "rnnzoo.benchmarks.isolation",
            "--heavy",
            scenario,
            "--target",
            target,
            "--progress",
            str(self.progress),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None  # stdout=PIPE
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the heavy client did not start: {line!r}")
        self.t0 = time.perf_counter()
        self.n0 = self.done()

    def done(self) -> int:
        return len(self.progress.read_text().splitlines())

    def stop(self) -> dict:
        n, dt = self.done() - self.n0, time.perf_counter() - self.t0
        self.proc.kill()
        self.proc.wait()
        return {"heavy_requests": n, "heavy_per_s": n / dt}


# ---- the run -------------------------------------------------------------------------------------
def run(scenarios: list[str], duration_s: float, baseline: bool, nices=(10,), log=print) -> dict:
    result: dict = {"cpus": os.cpu_count(), "duration_s": duration_s, "runs": []}
    with tempfile.TemporaryDirectory(prefix="rnnzoo-iso-") as tmp:
        d = Path(tmp)
        log("exporting the benchmark models ...")
        build_models(d)
        setups = [(True, n) for n in nices] + ([(False, 0)] if baseline else [])
        for pool, nice in setups:
            tag = f"pool on, nice {nice}" if pool else "pool off"
            with server(d, pool, nice) as srv:
                assert srv.proc is not None  # started by server()
                pid = srv.proc.pid
                light(srv.target, 1.0, 0.5)  # warm the server up
                alone = light(srv.target, duration_s)
                log(
                    f"[{tag}] light alone: p50 {alone['p50_ms']:.3f} ms, p99 {alone['p99_ms']:.3f} ms"
                )
                for sc in scenarios:
                    h = HeavyProcess(srv.target, sc, d)
                    try:
                        loaded = light(srv.target, duration_s)
                    finally:
                        work = h.stop()
                    time.sleep(0.5)
                    row = {
                        "pool": pool,
                        "nice": nice,
                        "scenario": sc,
                        "alone": alone,
                        "loaded": loaded,
                        "p50_ratio": loaded["p50_ms"] / alone["p50_ms"],
                        "p99_ratio": loaded["p99_ms"] / alone["p99_ms"],
                        **work,
                        "server_rss_mb": (_rss_kb(pid) or 0) / 1024,
                    }
                    result["runs"].append(row)
                    log(
                        f"[{tag}] {sc:5s}: light p50 "
                        f"{loaded['p50_ms']:.3f} ms ({row['p50_ratio']:.2f}x), p99 "
                        f"{loaded['p99_ms']:.3f} ms ({row['p99_ratio']:.2f}x; target <= 2x), "
                        f"max {loaded['max_ms']:.1f} ms; heavy: {work['heavy_per_s']:.1f} "
                        "requests/s"
                    )
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenarios", default="bidir,infer", help="comma-separated: bidir, infer")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also run with the long-job pool off (the pre-issue-11 paths)",
    )
    p.add_argument("--nice", default="10", help="comma-separated --long-nice values to run")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")


def cmd(args: argparse.Namespace) -> int:
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in ("bidir", "infer")]
    if bad or not scenarios:
        from rnnzoo.errors import InvalidArgument

        raise InvalidArgument(f"--scenarios takes bidir and/or infer, got {args.scenarios!r}")
    nices = tuple(int(v) for v in args.nice.split(","))
    result = run(scenarios, args.duration, args.baseline, nices)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rnnzoo.benchmarks.isolation", description=__doc__.splitlines()[0]
    )
    add_arguments(p)
    p.add_argument("--heavy", choices=("bidir", "infer"), help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.heavy:
        heavy(args.target, args.heavy, Path(args.progress))
        return 0
    return cmd(args)


if __name__ == "__main__":
    sys.exit(main())
