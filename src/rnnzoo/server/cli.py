"""`rnnzoo serve`: the serving side of the CLI. No torch. (The client commands, `rnnzoo stream`
and `rnnzoo generate`, are in ``rnnzoo.client_cli``.)"""

from __future__ import annotations

import argparse
import asyncio


def register(sub: argparse._SubParsersAction) -> None:
    # the defaults are the dataclasses' own (one place): RuntimeOptions, ServerConfig,
    # AdmissionLimits; importing them loads no model and no torch
    from rnnzoo.server.runtime.options import RuntimeOptions
    from rnnzoo.server.transport.admission import AdmissionLimits
    from rnnzoo.server.transport.config import ServerConfig

    RUNTIME, SERVER, ADMISSION = RuntimeOptions(), ServerConfig(), AdmissionLimits()
    p = sub.add_parser("serve", help="serve a directory of ONNX models over gRPC")
    p.add_argument(
        "--model-dir", default="zoo", help="folder of .onnx files (default: %(default)s)"
    )
    p.add_argument("--host", default=SERVER.host, help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=SERVER.port, help="0 picks a free port (printed)")
    p.add_argument("--max-sessions", type=int, default=RUNTIME.max_sessions)
    p.add_argument(
        "--session-ttl", type=float, default=RUNTIME.session_ttl_s, help="idle seconds; 0 = never"
    )
    p.add_argument(
        "--on-full",
        choices=("reject", "evict"),
        default=RUNTIME.on_full,
        help="at --max-sessions: refuse new sessions, or evict the least recently used",
    )
    p.add_argument("--max-batch", type=int, default=RUNTIME.max_batch, help="sessions per ORT call")
    p.add_argument(
        "--max-delay-ms", type=float, default=RUNTIME.max_delay_ms, help="wait to fill a batch"
    )
    p.add_argument("--max-message-mb", type=float, default=SERVER.max_message_mb)
    p.add_argument(
        "--grace", type=float, default=SERVER.grace_s, help="seconds in-flight calls get at stop"
    )
    p.add_argument(
        "--state-store",
        default=None,
        metavar="DIR|redis://host:port/db",
        help="keep sessions in a durable store so they outlive this process: a "
        "directory (embedded SQLite, WAL) or a redis:// / rediss:// URL; default: "
        "none, sessions live in this process's memory only (docs/scale-out.md)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serving processes sharing the port (SO_REUSEPORT) and the sessions "
        "(needs --state-store when N > 1); 0 = one per usable core (CPU affinity "
        "and cgroup quota); default: %(default)s (docs/scale-out.md)",
    )
    lim = p.add_argument_group("limits (docs/limits.md)")
    lim.add_argument(
        "--max-request-steps",
        type=int,
        default=RUNTIME.max_request_steps,
        help="steps per Stream chunk / Infer (batch x time) / prompt",
    )
    lim.add_argument(
        "--max-buffer-steps",
        type=int,
        default=RUNTIME.max_buffer_steps,
        help="steps a bidirectional session may hold",
    )
    lim.add_argument("--max-generate-tokens", type=int, default=RUNTIME.max_generate_tokens)
    lim.add_argument(
        "--lease-ttl",
        type=float,
        default=RUNTIME.lease_ttl_s,
        help="seconds a stream's hold on its session lasts without renewal",
    )
    lim.add_argument(
        "--keepalive-time",
        type=float,
        default=SERVER.keepalive_time_s,
        help="ping a connection idle this many seconds",
    )
    lim.add_argument(
        "--keepalive-timeout",
        type=float,
        default=SERVER.keepalive_timeout_s,
        help="close it when a ping is unanswered this long",
    )
    lim.add_argument(
        "--max-rpcs", type=int, default=ADMISSION.max_rpcs, help="calls in flight at once"
    )
    lim.add_argument(
        "--max-streams", type=int, default=ADMISSION.max_streams, help="open Stream/Generate calls"
    )
    lim.add_argument(
        "--max-streams-per-connection", type=int, default=ADMISSION.max_streams_per_connection
    )
    lim.add_argument(
        "--max-streams-per-client",
        type=int,
        default=ADMISSION.max_streams_per_client,
        help="open streams of one client across its connections (its principal, else its address)",
    )
    lim.add_argument(
        "--stream-window-kb",
        type=int,
        default=SERVER.stream_window_kb,
        help="each stream's HTTP/2 receive window, fixed (default: grpc's, grown by BDP "
        "probing): what a stream that is never read can make the server buffer; times "
        "--max-streams-per-client, one client's share",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics (rnnzoo_*) over HTTP on --host at this port; "
        "0 picks a free one (printed); default: no metrics endpoint",
    )
    lim.add_argument(
        "--max-sessions-per-client",
        type=int,
        default=RUNTIME.max_sessions_per_client,
        help="live sessions per principal (per connection without auth); 0 = none",
    )
    lim.add_argument(
        "--requests-per-s",
        type=float,
        default=SERVER.requests_per_s,
        help="calls + Stream messages per second per client; 0 = no quota",
    )
    lim.add_argument("--burst", type=float, help="the rate quota's bursts (default 2 x rate)")
    lim.add_argument(
        "--long-job-steps",
        type=int,
        default=RUNTIME.long_job_steps,
        help="requests of this many steps run in the long-job pool, off the loop",
    )
    lim.add_argument(
        "--long-workers",
        type=int,
        default=RUNTIME.long_workers,
        help="long-job threads (low priority); 0 = cpu_count - 1",
    )
    lim.add_argument("--max-long-jobs", type=int, default=RUNTIME.max_long_jobs)
    lim.add_argument(
        "--no-malloc-trim",
        dest="malloc_trim",
        action="store_false",
        help="do not give freed memory back to the OS after large requests",
    )
    lim.add_argument(
        "--long-nice",
        type=int,
        default=RUNTIME.long_nice,
        help="nice value of the long-job threads (0-19; higher = yield more)",
    )
    lim.add_argument(
        "--max-long-jobs-per-client", type=int, default=RUNTIME.max_long_jobs_per_client
    )
    sec = p.add_argument_group("security (docs/limits.md)")
    sec.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve TLS")
    sec.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    sec.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by this CA (mTLS)",
    )
    sec.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="bearer tokens: lines 'principal:token' (or JSON); every call must send one",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--allow-failed-parity",
        action="store_true",
        help="serve models whose parity record (NAME.parity.json) says parity failed or judged "
        "another file; a warning is logged for each (default: refuse to start)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse to start when any model fails to load (default: serve the others and "
        "list the failed ones as not ready, with their reason)",
    )
    mc = p.add_argument_group("model versions and control (docs/kserve.md)")
    mc.add_argument(
        "--model-control",
        default="none",
        choices=("none", "poll", "explicit"),
        help="none: the models at start, never changed; poll: follow the repository folder "
        "(new NAME/VERSION/ folders load, removed ones retire); explicit: KServe "
        "RepositoryModelLoad/Unload (default: none)",
    )
    mc.add_argument(
        "--repository-poll-secs",
        type=float,
        default=15.0,
        help="--model-control poll: seconds between scans of the repository (default 15)",
    )
    mc.add_argument(
        "--load-model",
        action="append",
        default=[],
        metavar="NAME",
        help="--model-control explicit: load this model at start (repeatable; '*': all); "
        "without any, nothing loads until RepositoryModelLoad",
    )
    mc.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="a retired version's live sessions run on at most this many seconds, then get "
        "an error naming the version (default 600)",
    )
    p.set_defaults(func=cmd_serve)


def control_of(args: argparse.Namespace):
    """The model control options of ``rnnzoo serve``'s flags, checked."""
    from rnnzoo.server.runtime.repository import ControlOptions

    control = ControlOptions(
        args.model_control,
        args.repository_poll_secs,
        tuple(args.load_model),
        args.drain_timeout,
    )
    control.check()
    return control


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from rnnzoo.server.runtime import RuntimeOptions
    from rnnzoo.server.transport import ServerConfig, serve
    from rnnzoo.server.transport.logs import configure

    configure(getattr(logging, args.log_level.upper()))
    options = RuntimeOptions(
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_sessions=args.max_sessions,
        on_full=args.on_full,
        session_ttl_s=args.session_ttl or None,
        max_request_steps=args.max_request_steps,
        max_buffer_steps=args.max_buffer_steps,
        max_generate_tokens=args.max_generate_tokens,
        lease_ttl_s=args.lease_ttl,
        max_sessions_per_client=args.max_sessions_per_client,
        long_job_steps=args.long_job_steps,
        long_workers=args.long_workers,
        max_long_jobs=args.max_long_jobs,
        max_long_jobs_per_client=args.max_long_jobs_per_client,
        long_nice=args.long_nice,
        malloc_trim=args.malloc_trim,
        state_store=args.state_store,
    )
    options.check()
    from rnnzoo.server.transport.admission import AdmissionLimits

    config = ServerConfig(
        args.host,
        args.port,
        args.max_message_mb,
        args.grace,
        keepalive_time_s=args.keepalive_time,
        keepalive_timeout_s=args.keepalive_timeout,
        admission=AdmissionLimits(
            args.max_rpcs,
            args.max_streams,
            args.max_streams_per_connection,
            args.max_streams_per_client,
        ),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_tokens=args.auth_tokens,
        requests_per_s=args.requests_per_s,
        burst=args.burst,
        metrics_port=args.metrics_port,
        stream_window_kb=args.stream_window_kb,
    )
    config.check()
    from rnnzoo.server.runtime.repository import LoadOptions
    from rnnzoo.server.supervisor import Supervisor, spec_of, worker_count

    load = LoadOptions(
        strict=args.strict, allow_failed_parity=args.allow_failed_parity, control=control_of(args)
    )
    n = worker_count(args.workers, args.state_store)
    if n > 1:
        spec = spec_of(args.model_dir, options, config, args.log_level, load)
        sup = Supervisor(n, spec, config.host, config.port, config.grace_s, config.metrics_port)
        return asyncio.run(sup.run())
    asyncio.run(serve(args.model_dir, options, config, load=load))
    return 0
