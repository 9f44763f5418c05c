"""gRPC transport: thin grpc.aio servicers, interceptors, health, reflection."""
