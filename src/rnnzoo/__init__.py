"""rnnzoo: trained recurrent networks, exported to ONNX with state I/O, served over gRPC."""

__version__ = "0.1.0"
