"""A lone unary KServe sequence step against a stateless ModelInfer, side by side in one run.

    python -m rnnzoo.benchmarks.unary_step --model-dir DIR --model gru [--n 2000] [--json -]

One ``rnnzoo serve`` process (default batching: ``--max-delay-ms 1``), one client calling
sequentially, the two kinds of request alternating so that both see the same machine
moments: a one-step ModelInfer with ``sequence_id`` (the first with ``sequence_start``) and the
same one-step input with no sequence (whole-sequence inference from the initial state). The
result is each kind's p50 and p90 latency and the ratio of the p50s: a lone unary step should
not wait out the batching window (docs/kserve.md quotes the numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from rnnzoo.proto.inference.v2 import grpc_service_pb2 as kpb
from rnnzoo.proto.inference.v2 import grpc_service_pb2_grpc as kgrpc

from .servers import rnnzoo_server


def _request(model: str, x: np.ndarray, seq: int = 0, start: bool = False):
    req = kpb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    if seq:
        req.parameters["sequence_id"].int64_param = seq
        req.parameters["sequence_start"].bool_param = start
    return req


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q))


def measure(target: str, model: str, features: int, n: int, warmup: int = 50) -> dict:
    """Alternate ``n`` sequence steps and ``n`` stateless calls; latencies in microseconds."""
    x = np.random.default_rng(0).normal(size=(1, 1, features)).astype(np.float32)
    kinds: dict[str, list[float]] = {"sequence_step": [], "stateless": []}
    with grpc.insecure_channel(target) as ch:
        stub = kgrpc.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(_request(model, x, seq=7, start=True))
        for i in range(warmup + n):
            for kind in kinds:
                req = _request(model, x, seq=7) if kind == "sequence_step" else _request(model, x)
                t0 = time.perf_counter()
                stub.ModelInfer(req)
                if i >= warmup:
                    kinds[kind].append((time.perf_counter() - t0) * 1e6)
    out: dict = {"n": n, "model": model}
    for kind, lat in kinds.items():
        out[kind] = {
            "p50_us": round(_quantile(lat, 0.5), 1),
            "p90_us": round(_quantile(lat, 0.9), 1),
            "mean_us": round(statistics.fmean(lat), 1),
        }
    out["p50_ratio"] = round(out["sequence_step"]["p50_us"] / out["stateless"]["p50_us"], 3)
    return out


def run(model_dir: Path, model: str, features: int, n: int, max_delay_ms: float = 1.0) -> dict:
    with rnnzoo_server(model_dir, 64, max_delay_ms) as server:
        result = measure(server.target, model, features, n)
    result["max_delay_ms"] = max_delay_ms
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rnnzoo.benchmarks.unary_step")
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--model", default="gru")
    p.add_argument("--features", type=int, default=3, help="the model's input features")
    p.add_argument("--n", type=int, default=2000, help="requests of each kind")
    p.add_argument("--max-delay-ms", type=float, default=1.0)
    p.add_argument("--json", metavar="FILE", help="write the result as JSON ('-' = stdout)")
    args = p.parse_args(argv)
    result = run(args.model_dir, args.model, args.features, args.n, args.max_delay_ms)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        print()
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    s, u = result["sequence_step"], result["stateless"]
    print(
        f"unary sequence step p50 {s['p50_us']} us, stateless p50 {u['p50_us']} us "
        f"(ratio {result['p50_ratio']}), {args.n} each, --max-delay-ms {args.max_delay_ms}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
