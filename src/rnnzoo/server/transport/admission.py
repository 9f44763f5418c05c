"""Admission control: how many calls the server runs at once, decided by our own code.

Every rnnzoo call passes ``Admission.enter`` before its servicer runs (in the interceptor) and
``leave`` when it ends, however it ends. Over a limit the call is refused at once with
RESOURCE_EXHAUSTED saying which limit and what to do, never queued and never silently
CANCELLED. grpc's own limits (pending-request queue, maximum_concurrent_rpcs) are set above
these in ``server.py`` so that ours always decide first.

- ``max_rpcs``: calls in flight at once, of every kind;
- ``max_streams``: open streaming calls (Stream, StepMany, Generate, KServe's ModelStreamInfer);
- ``max_streams_per_connection``: open streaming calls from one connection (peer address), so
  one client cannot take every stream slot;
- ``max_streams_per_client``: open streaming calls of one client, across its connections: its
  principal with authentication, else its address (host, without the port: a client cannot
  get more by opening more connections). What a client can make the server buffer is per
  stream (HTTP/2 flow control: the requests it pushes and the responses it does not read;
  measured 2.3 MB per stream that pushed 1,000-step chunks and read nothing, issue 21: 200
  such streams took the server from 114 MB to 576 MB RSS), so this bounds one client's share.
"""

from __future__ import annotations

from dataclasses import dataclass

from rnnzoo.errors import InvalidArgument, ResourceExhausted
from rnnzoo.server.runtime.caller import CALLER

from .auth_failures import peer_host

STREAMING = frozenset({"Stream", "StepMany", "Generate", "ModelStreamInfer"})  # v1 and KServe v2


@dataclass
class AdmissionLimits:
    max_rpcs: int = 4096
    max_streams: int = 2048
    max_streams_per_connection: int = 1024
    max_streams_per_client: int = 256

    def check(self) -> None:
        names = ("max_rpcs", "max_streams", "max_streams_per_connection", "max_streams_per_client")
        for name in names:
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")


class Admission:
    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self.limits.check()
        self.rpcs = 0
        self.streams = 0
        self.per_peer: dict[str, int] = {}
        self.per_client: dict[str, int] = {}
        self.refused = 0

    @staticmethod
    def client_of(peer: str) -> str:
        """The key a client's streams count against: its principal, else its host."""
        caller = CALLER.get()
        if caller is not None and caller.principal is not None:
            return f"principal:{caller.principal}"
        return peer_host(peer)

    def enter(self, rpc: str, peer: str) -> tuple[bool, str, str]:
        """Admit a call (returns the ticket for ``leave``) or raise ResourceExhausted."""
        lim = self.limits
        if self.rpcs >= lim.max_rpcs:
            self.refused += 1
            raise ResourceExhausted(
                f"the server is running its maximum of {lim.max_rpcs} calls at once "
                "(max_rpcs); retry with backoff"
            )
        streaming = rpc in STREAMING
        client = ""
        if streaming:
            if self.streams >= lim.max_streams:
                self.refused += 1
                raise ResourceExhausted(
                    f"the server has its maximum of {lim.max_streams} open streams "
                    "(max_streams); close streams you no longer use, multiplex sessions over "
                    "fewer streams, or retry with backoff"
                )
            if self.per_peer.get(peer, 0) >= lim.max_streams_per_connection:
                self.refused += 1
                raise ResourceExhausted(
                    f"this connection has its maximum of {lim.max_streams_per_connection} "
                    "open streams (max_streams_per_connection); one stream can carry many "
                    "sessions: send their chunks over fewer streams"
                )
            client = self.client_of(peer)
            if self.per_client.get(client, 0) >= lim.max_streams_per_client:
                self.refused += 1
                who = "this principal" if client.startswith("principal:") else "this address"
                raise ResourceExhausted(
                    f"{who} has its maximum of {lim.max_streams_per_client} open streams "
                    "across its connections (max_streams_per_client); one stream can carry "
                    "many sessions: send their chunks over fewer streams, and read the "
                    "responses of the streams you have"
                )
            self.streams += 1
            self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
            self.per_client[client] = self.per_client.get(client, 0) + 1
        self.rpcs += 1
        return streaming, peer, client

    def leave(self, ticket: tuple[bool, str, str]) -> None:
        streaming, peer, client = ticket
        self.rpcs -= 1
        if streaming:
            self.streams -= 1
            for table, key in ((self.per_peer, peer), (self.per_client, client)):
                n = table[key] - 1
                if n:
                    table[key] = n
                else:
                    del table[key]
