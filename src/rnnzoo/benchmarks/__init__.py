"""rnnzoo benchmark harness: the rnnzoo server against the transport limit (an echo server),
the compute limit (a bare ONNX Runtime step loop), a naive server and PyTorch eager.

Run ``python -m rnnzoo.benchmarks --help``. Nothing is imported here: torch, grpc and
onnxruntime load only in the modules that need them.
"""
