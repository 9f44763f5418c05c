"""The compute side: (A) a bare ONNX Runtime step loop and (E) a PyTorch eager step loop.

(A) is the compute limit of a server: the same graph, the same ORT session options as the
server (one thread, sequential, no spinning), states fed back call after call, no transport,
no Python around it but the loop. steps/s = B * T * calls/s.
(E) is what a user writes by hand: ``net(x, state)`` under ``torch.no_grad()`` in a loop,
one thread (the server's setting, and fair on a shared 2-core machine).
Each figure is the best of ``repeats`` timed runs of ``seconds`` each: the least-disturbed
run on a shared machine, for both runtimes alike.
Also here: (A) with other ORT session options, idle and with one core busy (why the server
uses the options it does), and the cost of one B=1 call after an idle gap (``ort_cold_call``:
what a lone session's step costs, which bounds D/B at 1 session).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import numpy as np


def _best_rate(step, seconds: float, repeats: int) -> float:
    """Calls/s of ``step()``: best of ``repeats`` runs of about ``seconds`` each."""
    step()  # warm-up: first-call allocations, kernel selection
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        deadline = t0 + seconds
        while True:
            step()
            n += 1
            t = time.perf_counter()
            if t >= deadline:
                break
        best = max(best, n / (t - t0))
    return best


def _ort_case(onnx_path: Path, batch: int, steps: int, options=None):
    """An ORT session (``options``: an ``ort.SessionOptions``, default the server's), a random
    (B, T) input with zero states as feeds, and the fetch names: outputs, then next states."""
    import onnxruntime as ort

    from rnnzoo.contract import read_contract
    from rnnzoo.ort_options import session_options

    contract = read_contract(onnx_path)
    so = options if options is not None else session_options(1, 1)
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    (x_spec,) = contract.inputs
    feat = [int(d) for d in x_spec.feature_shape()]
    feeds = {
        x_spec.name: np.random.default_rng(0)
        .standard_normal((batch, steps, *feat))
        .astype(np.float32)
    }
    for st in contract.states:
        feeds[st.input] = np.zeros(
            [batch if i == st.batch_axis else cast(int, d) for i, d in enumerate(st.shape)],
            np.float32,
        )
    names = [o.name for o in contract.outputs] + [st.output for st in contract.states]
    return sess, contract, feeds, names


def ort_loop(
    onnx_path: Path,
    batch: int,
    steps: int,
    *,
    seconds: float = 0.5,
    repeats: int = 3,
    options=None,
) -> dict:
    """(A): steps/s of ``session.run`` on (B, T) chunks, state carried over between calls.
    ``options``: an ``ort.SessionOptions``; default the server's (``session_options(1, 1)``)."""
    sess, contract, feeds, out_names = _ort_case(onnx_path, batch, steps, options)
    n_out = len(contract.outputs)

    def step() -> None:
        res = sess.run(out_names, feeds)
        for st, r in zip(contract.states, res[n_out:], strict=True):
            feeds[st.input] = r  # (L*D, B, H): carried to the next call

    calls = _best_rate(step, seconds, repeats)
    return {
        "batch": batch,
        "steps": steps,
        "calls_per_s": calls,
        "steps_per_s": calls * batch * steps,
    }


def option_sets() -> dict[str, object]:
    """ORT session options compared for step serving: the server's choice and the obvious
    alternatives (more threads, with and without spinning, and ORT's own defaults)."""
    import onnxruntime as ort

    from rnnzoo.ort_options import session_options

    defaults = ort.SessionOptions()
    defaults.log_severity_level = 3
    return {
        "rnnzoo: 1 thread, sequential, no spinning": session_options(1, 1),
        "2 intra-op threads, spinning": session_options(2, 1, spin=True),
        "2 intra-op threads, no spinning": session_options(2, 1),
        "ORT defaults (threads = cores, spinning)": defaults,
    }


def ort_options_rows(
    onnx_path: Path, batches: tuple[int, ...], *, seconds: float, repeats: int
) -> list[dict]:
    """Steps/s (T=1) per option set and batch, on an idle machine and with one core taken by a
    busy process: a server's event loop and its clients compete with ORT for the cores."""
    rows = []
    for busy in (False, True):
        hog = _cpu_hog() if busy else None
        try:
            for name, so in option_sets().items():
                for b in batches:
                    r = ort_loop(onnx_path, b, 1, seconds=seconds, repeats=repeats, options=so)
                    rows.append(
                        {
                            "options": name,
                            "batch": b,
                            "busy_core": busy,
                            "steps_per_s": r["steps_per_s"],
                        }
                    )
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    return rows


def _cpu_hog():
    """A process that keeps one core busy (a pure-Python spin), killed by the caller."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def ort_cold_call(onnx_path: Path, gap_s: float, calls: int = 300) -> dict:
    """One B=1, T=1 ``session.run`` after the process idled ``gap_s``, as a server does
    between a lone client's messages; median and p90 over ``calls``, and the hot-loop time.

    A hot loop keeps the weights (0.8 MB for the bench model) and ORT's buffers in cache; a
    server waiting for the next message does not, and a lone session pays that on every step.
    """
    sess, _, feeds, names = _ort_case(onnx_path, 1, 1)
    for _ in range(20):
        sess.run(names, feeds)
    hot = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sess.run(names, feeds)
        hot.append(time.perf_counter() - t0)
    cold = []
    for _ in range(calls):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        sess.run(names, feeds)
        cold.append(time.perf_counter() - t0)
    us = lambda v, q: float(np.percentile(v, q)) * 1e6  # noqa: E731
    return {
        "gap_us": gap_s * 1e6,
        "calls": calls,
        "median_us": us(cold, 50),
        "p90_us": us(cold, 90),
        "hot_us": us(hot, 50),
    }


def torch_loop(net, batch: int, steps: int, *, seconds: float = 0.5, repeats: int = 3) -> dict:
    """(E): steps/s of a hand-written PyTorch eager step loop, state carried over."""
    import torch

    cfg = net.cfg
    x = torch.randn(batch, steps, cfg.input_size)  # (B, T, F)
    state = net.initial_state(batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def step() -> None:
        nonlocal state
        with torch.no_grad():
            _, state = net(x, state)

    try:
        calls = _best_rate(step, seconds, repeats)
    finally:
        torch.set_num_threads(threads)
    return {
        "batch": batch,
        "steps": steps,
        "calls_per_s": calls,
        "steps_per_s": calls * batch * steps,
    }
