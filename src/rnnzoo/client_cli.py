"""`rnnzoo stream`, `rnnzoo generate`: the client side of the CLI. No torch, no server."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from rnnzoo.errors import FailedPrecondition, InvalidArgument


def register(sub: argparse._SubParsersAction) -> None:
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
    g.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the bearer token (default: $RNNZOO_TOKEN, if set)",
    )
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
