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
from rnnzoo.export.verify import _feeds, _random_case, make_session
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
    net = net.eval()
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    try:
        for label, B, T in shapes:
            x, state = _random_case(net, B, T, gen)
            feeds = _feeds(contract, x, state)
            # Long sequences: fewer repeats, same median estimator.
            n = max(3, repeats // (1 + T // 100))

            def run_torch(x=x, state=state):
                with torch.no_grad():
                    net(x, state)

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
    finally:
        torch.set_num_threads(threads)
    return out
