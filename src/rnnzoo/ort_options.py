"""ONNX Runtime session options shared by serving, export checks and benchmarks.

A neutral module (numpy/onnxruntime only) so that ``rnnzoo.export`` never imports server
internals. Why these options: on 2 shared cores, 1 intra-op + 1 inter-op thread, sequential
execution and no spin-waiting were fastest at B=1 and under load (docs/benchmarks.md).
"""

from __future__ import annotations

import onnxruntime as ort


def session_options(intra: int = 1, inter: int = 1, spin: bool = False) -> ort.SessionOptions:
    """The server's ORT options; ``spin`` only for comparing (see benchmarks/compute.py)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra
    so.inter_op_num_threads = inter
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    return so


def run_fn(session: ort.InferenceSession):
    """``session.run`` without the Python wrapper's per-call checks: the C++ session's own
    ``run(output_names, feeds, run_options)``.

    Why: the wrapper re-checks every call that each graph input is fed (reading each input's
    name and type through pybind) and asks whether WebGPU graph capture is on. Measured on
    the bench model (B=1, T=1, 2-core AMD EPYC): 68 µs through the wrapper, 54 µs direct. Our
    callers build feeds from the contract, checked at load, so the check can never fire; a
    missing feed still fails, in ORT's C++ code. Falls back to the wrapper when an ORT
    version lays the session out differently (the pin is ==1.32.0; tests/test_ort_options.py
    checks the direct call gives the wrapper's results). The wrapper's other job, retrying
    on another execution provider after an EP failure, does not apply: we run on the CPU
    provider only.
    """
    direct = getattr(getattr(session, "_sess", None), "run", None)
    if direct is None:
        return lambda names, feeds: session.run(names, feeds)
    return lambda names, feeds: direct(names, feeds, None)
