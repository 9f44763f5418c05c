"""Serving core: ONNX Runtime sessions, model repository, session store, batching. No grpc, no torch."""
