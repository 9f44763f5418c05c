"""gRPC transport: thin grpc.aio servicers, interceptors, health, reflection."""

from .server import BackgroundServer, RnnzooServer, ServerConfig, serve

__all__ = ["BackgroundServer", "RnnzooServer", "ServerConfig", "serve"]
