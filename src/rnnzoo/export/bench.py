"""ONNX Runtime vs PyTorch speed for one graph, measured side by side in one run.

Two shapes matter for serving: one step at B=1 (a streaming session's latency) and a
whole sequence of T=1000 at B=1. Both runtimes get one thread (the server's setting) and
the same inputs; each time is the median of ``repeats`` runs after a warm-up. The ratio is
``torch / ort``: above 1 means ONNX Runtime is faster. A benchmark, not a test: the numbers
are noisy on shared machines and nothing asserts on them.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rnnzoo.contract import Contract, read_contract
from rnnzoo.export.native import one_thread
from rnnzoo.export.onnx_export import FlatNet
from rnnzoo.export.parity import make_session
from rnnzoo.export.sampling import make_sampler
from rnnzoo.models.rnn import RecurrentNet


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_net(
    net: RecurrentNet,
    onnx_path: str | Path,
    *,
    contract: Contract | None = None,
    shapes: tuple[tuple[str, int, int], ...] = (("step", 1, 1), ("seq1000", 1, 1000)),
    repeats: int = 20,
) -> dict[str, Any]:
    """{label: {"torch_ms", "ort_ms", "ratio"}} for each (label, B, T) in ``shapes``."""
    contract = contract or read_contract(onnx_path)
    sess = make_session(onnx_path)
    flat = FlatNet(net.eval())
    sample = make_sampler(contract)
    names = [t.name for t in contract.inputs] + [s.input for s in contract.states]
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    with one_thread():
        for label, B, T in shapes:
            xs, states = sample(B, T, gen)
            args = [*xs, *states]
            feeds = {n: a.numpy() for n, a in zip(names, args, strict=True)}
            # Long sequences: fewer repeats, same median estimator.
            n = max(3, repeats // (1 + T // 100))

            def run_torch(args=args):
                with torch.no_grad():
                    flat(*args)

            def run_ort(feeds=feeds):
                sess.run(None, feeds)

            t_torch = _median_seconds(run_torch, n)
            t_ort = _median_seconds(run_ort, n)
            out[label] = {
                "batch": B,
                "time": T,
                "torch_ms": round(t_torch * 1e3, 4),
                "ort_ms": round(t_ort * 1e3, 4),
                "ratio": round(t_torch / t_ort, 2),
            }
    return out
