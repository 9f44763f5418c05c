"""Request bytes -> messages, decoded by us: undecodable bytes are INVALID_ARGUMENT.

grpc's own handling of a request deserializer that raises is UNKNOWN (unary) or INTERNAL with
a traceback (a streamed message), so our deserializers never raise: bytes that do not parse
become a ``Malformed`` value, and whoever receives it (the interceptor for a unary request,
the Stream servicer for each streamed one) raises its ``InvalidArgument``. The handlers are
registered from the service descriptor, like the generated ``add_RnnzooServicer_to_server``
but with these deserializers.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message

from rnnzoo.errors import InvalidArgument
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Rnnzoo"]


@dataclass(frozen=True, slots=True)
class Malformed:
    """Request bytes that are not a valid ``message`` (what the deserializer returns)."""

    message: str  # the expected message type's full name, e.g. rnnzoo.v1.StreamRequest
    size: int
    why: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid {self.message} ({self.size} bytes: "
            f"{self.why[:200]}); send a serialized {self.message.rsplit('.', 1)[-1]} message"
        )


def checked(request):
    """``request``, or raise the InvalidArgument of a Malformed one."""
    if type(request) is Malformed:
        raise request.error()
    return request


def _deserializer(cls: type[Message]):
    name = cls.DESCRIPTOR.full_name
    from_string = cls.FromString

    def decode(data: bytes):
        try:
            return from_string(data)
        except DecodeError as exc:
            return Malformed(name, len(data), str(exc) or type(exc).__name__)

    return decode


def method_handlers(servicer, service=SERVICE, module=pb) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per RPC of ``service`` (default rnnzoo.v1.Rnnzoo) that ``servicer``
    implements, with our deserializers (the others answer UNIMPLEMENTED)."""
    handlers = {}
    for m in service.methods:
        if not hasattr(servicer, m.name):
            continue
        request = getattr(module, m.input_type.name)
        response = getattr(module, m.output_type.name)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = factory(
            getattr(servicer, m.name),
            request_deserializer=_deserializer(request),
            response_serializer=response.SerializeToString,
        )
    return handlers


def add_servicer(servicer, server: grpc.aio.Server, service=SERVICE, module=pb) -> None:
    handlers = method_handlers(servicer, service, module)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
