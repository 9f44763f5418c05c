"""What every interceptor that wraps a method handler needs: its behaviour and its factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def handler_parts(handler: grpc.RpcMethodHandler) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(the handler's behaviour, the ``grpc.*_rpc_method_handler`` that rebuilds one like it)."""
    if handler.response_streaming:
        if handler.request_streaming:
            return handler.stream_stream, grpc.stream_stream_rpc_method_handler
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler
