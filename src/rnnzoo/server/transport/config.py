"""The server's configuration: one dataclass whose defaults are the server's defaults
(``rnnzoo serve`` reads its flags' defaults from here). Light: importing it loads no model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from rnnzoo.errors import InvalidArgument

from .admission import AdmissionLimits

if TYPE_CHECKING:
    import grpc

    from .guard import Guard

MB = 1 << 20


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # localhost only unless asked: sessions carry no auth
    port: int = 50051  # 0 = any free port (see RnnzooServer.port)
    max_message_mb: float = 16.0  # per message, both directions; over it: RESOURCE_EXHAUSTED
    grace_s: float = 5.0
    # keepalive: detect dead and frozen peers (their streams then detach)
    keepalive_time_s: float = 20.0  # ping a connection idle this long
    keepalive_timeout_s: float = 10.0  # ...and close it if the ping is not answered by then
    min_client_ping_interval_s: float = 10.0  # clients may ping this often (no data needed)
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    # each stream's HTTP/2 receive window, fixed (BDP probing off); None = grpc's own, grown by
    # BDP probing. grpc core reads a stream's requests ahead into this window whether or not
    # the servicer reads them, so it is what one unread stream costs: measured (issue 21, one
    # client, 200 streams pushing 1,000-step chunks unread) +110 to +270 MB RSS with grpc's
    # windows, +50 to +60 MB with 16 KB. With max_streams_per_client it bounds one client's
    # buffered requests in bytes. A message larger than the window still passes (grpc opens
    # the window to the message being read), in more round trips.
    stream_window_kb: int | None = None
    metrics_port: int | None = None  # Prometheus text over HTTP on host:port; 0 = any free
    # security: PEM file paths; TLS needs both cert and key; a client CA turns on mTLS
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_tokens: str | None = None  # token file (guard.TokenTable.from_file)
    requests_per_s: float = 0.0  # per client (principal, or connection); 0 = no rate quota
    burst: float | None = None  # the rate quota's bucket; None = 2 x requests_per_s
    # a worker of ``rnnzoo serve --workers N`` (server/supervisor.py): share the port the supervisor
    # reserved (SO_REUSEPORT), and record metrics for the supervisor's exporter
    reuseport: bool = False
    record_metrics: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def credentials(self) -> grpc.ServerCredentials | None:
        import grpc

        """The server's TLS credentials (None: plaintext), files read now."""
        if not self.tls:
            return None

        def read(path: str, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise InvalidArgument(f"cannot read the {what} {path}: {exc.strerror}") from None

        # tls: a certificate given, and with it a key (checked where the config is made)
        key = read(cast(str, self.tls_key), "TLS key (--tls-key)")
        cert = read(cast(str, self.tls_cert), "TLS certificate (--tls-cert)")
        ca = read(self.tls_client_ca, "client CA (--tls-client-ca)") if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )

    def guard(self) -> Guard:
        from .guard import Guard, RateQuota, TokenTable

        tokens = TokenTable.from_file(self.auth_tokens) if self.auth_tokens else None
        rate = RateQuota(self.requests_per_s, self.burst) if self.requests_per_s else None
        return Guard(tokens, rate, cert_principals=tokens is None and bool(self.tls_client_ca))

    def check(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls:
            raise InvalidArgument("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        if self.requests_per_s < 0:
            raise InvalidArgument(f"requests_per_s must be >= 0, got {self.requests_per_s}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"metrics port must be in [0, 65535], got {self.metrics_port}")
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port must be in [0, 65535], got {self.port}")
        if self.max_message_mb <= 0:
            raise InvalidArgument(f"max message size must be > 0 MB, got {self.max_message_mb}")
        if self.grace_s < 0:
            raise InvalidArgument(f"grace period must be >= 0 s, got {self.grace_s}")
        for name in ("keepalive_time_s", "keepalive_timeout_s", "min_client_ping_interval_s"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name} must be > 0, got {getattr(self, name)}")
        if self.stream_window_kb is not None and not 1 <= self.stream_window_kb <= 1 << 20:
            raise InvalidArgument(
                f"stream window must be in [1, 1048576] KB, got {self.stream_window_kb}"
            )
        self.admission.check()

    def grpc_options(self) -> list[tuple[str, int]]:
        size = int(self.max_message_mb * MB)
        pending = 4 * self.admission.max_rpcs  # grpc's queue above ours: we refuse first
        return [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            # grpc shares a busy port by default (SO_REUSEPORT): two servers would split
            # the traffic and each see half of the sessions. Fail the bind instead. Workers
            # (server/supervisor.py) share the port their supervisor reserved after the same check.
            ("grpc.so_reuseport", 1 if self.reuseport else 0),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.http2.ping_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle stream's peer
            (
                "grpc.http2.min_recv_ping_interval_without_data_ms",
                int(self.min_client_ping_interval_s * 1000),
            ),
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
            *self._window_options(),
        ]

    def _window_options(self) -> list[tuple[str, int]]:
        if self.stream_window_kb is None:
            return []
        return [
            ("grpc.http2.bdp_probe", 0),  # else grpc grows each window to the link's BDP
            ("grpc.http2.lookahead_bytes", self.stream_window_kb * 1024),
        ]
