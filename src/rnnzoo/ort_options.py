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
