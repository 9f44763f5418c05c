"""`rnnzoo serve`, `rnnzoo stream`, `rnnzoo generate`: the serving side of the CLI. No torch."""

from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np

from rnnzoo.errors import FailedPrecondition, InvalidArgument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a directory of ONNX models over gRPC")
    p.add_argument(
        "--model-dir", default="zoo", help="folder of .onnx files (default: %(default)s)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port (printed)")
    p.add_argument("--max-sessions", type=int, default=10_000)
    p.add_argument("--session-ttl", type=float, default=600.0, help="idle seconds; 0 = never")
    p.add_argument("--on-full", choices=("reject", "evict"), default="reject",
                   help="at --max-sessions: refuse new sessions, or evict the least recently used")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=64, help="sessions per ORT call")
    p.add_argument("--max-delay-ms", type=float, default=1.0, help="wait to fill a batch")
    p.add_argument("--max-message-mb", type=float, default=16.0)
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get at stop")
    p.add_argument("--state-store", default=None, metavar="DIR|redis://host:port/db",
                   help="keep sessions in a durable store so they outlive this process: a "
                   "directory (embedded SQLite, WAL) or a redis:// / rediss:// URL; default: "
                   "none, sessions live in this process only (docs/scale-out.md)")  # fmt: skip
    lim = p.add_argument_group("limits (docs/limits.md)")
    lim.add_argument("--max-request-steps", type=int, default=100_000,
                     help="steps per Stream chunk / Infer (batch x time) / prompt")  # fmt: skip
    lim.add_argument("--max-buffer-steps", type=int, default=10_000,
                     help="steps a bidirectional session may hold")  # fmt: skip
    lim.add_argument("--max-generate-tokens", type=int, default=4_096)
    lim.add_argument("--lease-ttl", type=float, default=30.0,
                     help="seconds a stream's hold on its session lasts without renewal")  # fmt: skip
    lim.add_argument("--keepalive-time", type=float, default=20.0,
                     help="ping a connection idle this many seconds")  # fmt: skip
    lim.add_argument("--keepalive-timeout", type=float, default=10.0,
                     help="close it when a ping is unanswered this long")  # fmt: skip
    lim.add_argument("--max-rpcs", type=int, default=4096, help="calls in flight at once")
    lim.add_argument("--max-streams", type=int, default=2048, help="open Stream/Generate calls")
    lim.add_argument("--max-streams-per-connection", type=int, default=1024)
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics (rnnzoo_*) over HTTP on --host at this port; "
                   "0 picks a free one (printed); default: no metrics endpoint")  # fmt: skip
    lim.add_argument("--max-sessions-per-client", type=int, default=5_000,
                     help="live sessions per principal (per connection without auth); 0 = none")  # fmt: skip
    lim.add_argument("--requests-per-s", type=float, default=0.0,
                     help="calls + Stream messages per second per client; 0 = no quota")  # fmt: skip
    lim.add_argument("--burst", type=float, help="the rate quota's bursts (default 2 x rate)")
    lim.add_argument("--long-job-steps", type=int, default=2_048,
                     help="requests of this many steps run in the long-job pool, off the loop")  # fmt: skip
    lim.add_argument("--long-workers", type=int, default=0,
                     help="long-job threads (low priority); 0 = cpu_count - 1")  # fmt: skip
    lim.add_argument("--max-long-jobs", type=int, default=64)
    lim.add_argument("--no-malloc-trim", dest="malloc_trim", action="store_false",
                     help="do not give freed memory back to the OS after large requests")  # fmt: skip
    lim.add_argument("--long-nice", type=int, default=10,
                     help="nice value of the long-job threads (0-19; higher = yield more)")  # fmt: skip
    lim.add_argument("--max-long-jobs-per-client", type=int, default=8)
    sec = p.add_argument_group("security (docs/limits.md)")
    sec.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve TLS")
    sec.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    sec.add_argument("--tls-client-ca", metavar="PEM",
                     help="require client certificates signed by this CA (mTLS)")  # fmt: skip
    sec.add_argument("--auth-tokens", metavar="FILE",
                     help="bearer tokens: lines 'principal:token' (or JSON); every call must send one")  # fmt: skip
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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stream", help="stream a generated signal to a forecasting model")
    p.add_argument("--model", required=True)
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--chunk", type=int, default=1, help="steps per request")
    p.add_argument("--seed", type=int, default=0, help="noise of the generated signal")
    p.add_argument("--plot", metavar="FILE.png", help="save signal and predictions (matplotlib)")
    add_client_arguments(p)
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("generate", help="generate text with an lm or seq2seq model")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    p.add_argument("--seed", type=int)
    add_client_arguments(p)
    p.set_defaults(func=cmd_generate)


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection security")
    g.add_argument("--token-file", metavar="FILE",
                   help="file holding the bearer token (default: $RNNZOO_TOKEN, if set)")  # fmt: skip
    g.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA")
    g.add_argument("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
    g.add_argument("--tls-key", metavar="PEM", help="the client certificate's key (mTLS)")


def client_from_args(args: argparse.Namespace):
    """A Client for ``--target`` with the connection-security arguments."""
    import os
    from pathlib import Path

    from rnnzoo.client import Client

    token = os.environ.get("RNNZOO_TOKEN") or None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read --token-file {args.token_file}: {exc.strerror}"
            ) from None
    return Client(
        args.target, token=token, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
    )


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
        admission=AdmissionLimits(args.max_rpcs, args.max_streams, args.max_streams_per_connection),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_tokens=args.auth_tokens,
        requests_per_s=args.requests_per_s,
        burst=args.burst,
        metrics_port=args.metrics_port,
    )
    config.check()
    from rnnzoo.server.runtime.repository import ALLOW_FAILED_PARITY

    ALLOW_FAILED_PARITY.set(args.allow_failed_parity)  # read where the models load
    from rnnzoo.server.runtime.repository import STRICT

    STRICT.set(args.strict)
    asyncio.run(serve(args.model_dir, options, config))
    return 0


def signal_wave(steps: int, features: int, seed: int = 0) -> np.ndarray:
    """A noisy sum of two sines per feature (phase-shifted): (steps, features) float32."""
    t = np.arange(steps)[:, None]
    f = np.arange(features)[None, :]
    clean = np.sin(2 * np.pi * t / 40 + f) + 0.5 * np.sin(2 * np.pi * t / 11 + 2 * f)
    noise = np.random.default_rng(seed).normal(0.0, 0.05, clean.shape)
    return (clean + noise).astype(np.float32)


def _feature_count(info) -> int:
    inputs = info.graphs[0].inputs if info.graphs else []
    if len(inputs) != 1 or inputs[0].dtype not in ("float32", "float64", "float16"):
        raise InvalidArgument(
            f"model {info.name!r} (task {info.task}) does not take one float signal; "
            "`rnnzoo stream` feeds forecasting-style models (input x: (batch, time, F))"
        )
    dims = [d for i, d in enumerate(inputs[0].shape) if i not in (0, 1)]
    if len(dims) != 1 or not dims[0].HasField("size"):
        raise InvalidArgument(f"model {info.name!r} input is not (batch, time, F) with fixed F")
    return int(dims[0].size)


def cmd_stream(args: argparse.Namespace) -> int:
    import grpc

    if args.steps < 1 or args.chunk < 1:
        raise InvalidArgument("--steps and --chunk must be >= 1")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            raise FailedPrecondition("--plot needs matplotlib: pip install matplotlib") from None
    with client_from_args(args) as client:
        try:
            info = client.model(args.model)
            x = signal_wave(args.steps, _feature_count(info), args.seed)
            # The contract's normalisation: the model reads (v - mean) / std and answers in
            # the same units, so scale on the way in and back on the way out.
            mean = info.normalization.get("mean", 0.0)
            std = info.normalization.get("std", 1.0)
            preds = np.full((args.steps, 0), np.nan, np.float32)
            done = 0  # steps printed so far
            with client.session(args.model) as s:
                xn = ((x - mean) / std).astype(np.float32)
                chunks = [xn[i : i + args.chunk] for i in range(0, args.steps, args.chunk)]
                for out in s.stream(chunks):
                    y = out.value.reshape(out.value.shape[0], -1) * std + mean
                    if preds.shape[1] == 0:
                        preds = np.full((args.steps, y.shape[1]), np.nan, np.float32)
                    preds[out.start : out.start + len(y)] = y  # revised outputs overwrite
                    for t in range(done, out.steps_total):  # the new steps only
                        vals = " ".join(f"{v:+.4f}" for v in preds[t][:4])
                        print(f"t={t:<5d} x={x[t, 0]:+.4f}  y={vals}", flush=True)
                    done = out.steps_total
        except grpc.RpcError as err:
            print(f"rnnzoo: error: {err}", file=sys.stderr)
            return 1
    if args.plot:
        _plot(args.plot, args.model, x, preds)
        print(f"saved {args.plot}")
    return 0


def _plot(path: str, model: str, x: np.ndarray, preds: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(x[:, 0], label="signal x[:, 0]", lw=1)
    ax.plot(preds[:, 0], label=f"{model} output[:, 0]", lw=1)
    ax.set_xlabel("step")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    with client_from_args(args) as client:
        try:
            seq2seq = client.model(args.model).task == "seq2seq"
            print(args.prompt + (" -> " if seq2seq else ""), end="", flush=True)
            for piece in client.generate(
                args.model, args.prompt, args.max_tokens, args.temperature, args.top_k, args.seed
            ):
                print(piece, end="", flush=True)
            print()
        except grpc.RpcError as err:
            print(f"\nrnnzoo: error: {err}", file=sys.stderr)
            return 1
    return 0
