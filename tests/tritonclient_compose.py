"""Run by tests/test_composition.py under .venv-triton/bin/python (the unmodified
``tritonclient[grpc]``): KServe sequences, unary, streamed and mixed, against a real rnnzoo
server, compared with the reference outputs the test computed with onnxruntime on the model
file. Exits non-zero on any mismatch.

    python tritonclient_compose.py HOST:PORT DATA.npz MODE [--ca PEM] [--token TOKEN]

MODE: ``all`` (three whole sequences), ``start`` (two sequences, unary and streamed, up to
the cut; their outputs saved to DATA.start.npz) or ``finish`` (the same two continued to the
end after a server restart, checked whole). Imports nothing of rnnzoo.
"""

from __future__ import annotations

import argparse
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TOL = 1e-5


class Seq:
    def __init__(self, args: argparse.Namespace) -> None:
        self.client = grpcclient.InferenceServerClient(
            args.target, ssl=bool(args.ca), root_certificates=args.ca
        )
        self.headers = {"authorization": f"Bearer {args.token}"} if args.token else None
        self.results: queue.Queue = queue.Queue()
        self.model = "gru"

    def _inputs(self, x: np.ndarray) -> list:
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return [inp]

    def unary(self, x: np.ndarray, seq: int | str, start: bool = False, end: bool = False):
        res = self.client.infer(
            self.model,
            self._inputs(x),
            sequence_id=seq,
            sequence_start=start,
            sequence_end=end,
            headers=self.headers,
        )
        return res.as_numpy("y")

    def open(self) -> None:
        self.client.start_stream(
            callback=lambda result, error: self.results.put((result, error)), headers=self.headers
        )

    def streamed(self, x: np.ndarray, seq: int | str, start: bool = False, end: bool = False):
        self.client.async_stream_infer(
            self.model, self._inputs(x), sequence_id=seq, sequence_start=start, sequence_end=end
        )
        result, error = self.results.get(timeout=60)
        if error is not None:
            raise error
        return result.as_numpy("y")

    def close(self) -> None:
        self.client.stop_stream()


def check(name: str, got: list[np.ndarray], ref: np.ndarray) -> None:
    out = np.concatenate(got, axis=1)
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    worst = float(np.abs(out - ref).max())
    assert worst <= TOL, f"{name}: {worst} off onnxruntime"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("data")
    ap.add_argument("mode", choices=["all", "start", "finish"])
    ap.add_argument("--ca")
    ap.add_argument("--token")
    args = ap.parse_args()
    data = np.load(args.data)
    x, ref, tag = data["x"], data["ref"], str(data["tag"])
    s = Seq(args)
    a, b, t = 3, 7, x.shape[1]
    if args.mode == "all":
        # unary: start, continue, end
        got = [
            s.unary(x[:, :a], f"{tag}-u", start=True),
            s.unary(x[:, a:b], f"{tag}-u"),
            s.unary(x[:, b:], f"{tag}-u", end=True),
        ]
        check("unary", got, ref)
        try:
            s.unary(x[:, :1], f"{tag}-u")
            raise AssertionError("an ended sequence went on")
        except InferenceServerException as exc:
            assert "NOT_FOUND" in str(exc) and "sequence_start" in str(exc), str(exc)
        # streamed, an integer id
        s.open()
        seq = 9000 + len(tag)
        got = [
            s.streamed(x[:, :a], seq, start=True),
            s.streamed(x[:, a:b], seq),
            s.streamed(x[:, b:], seq, end=True),
        ]
        s.close()
        check("streamed", got, ref)
        # mixed: unary, then a stream, then unary again once the stream ended
        got = [s.unary(x[:, :a], f"{tag}-m", start=True)]
        s.open()
        got.append(s.streamed(x[:, a:b], f"{tag}-m"))
        s.close()
        got.append(s.unary(x[:, b:], f"{tag}-m", end=True))
        check("mixed", got, ref)
        return 0
    cut = t // 2
    if args.mode == "start":
        first_u = s.unary(x[:, :cut], f"{tag}-ru", start=True)
        s.open()
        first_s = s.streamed(x[:, :cut], f"{tag}-rs", start=True)
        s.close()
        np.savez(args.data.replace(".npz", ".start.npz"), u=first_u, s=first_s)
        return 0
    first = np.load(args.data.replace(".npz", ".start.npz"))
    check("unary across a restart", [first["u"], s.unary(x[:, cut:], f"{tag}-ru", end=True)], ref)
    s.open()
    rest = s.streamed(x[:, cut:], f"{tag}-rs", end=True)
    s.close()
    check("streamed across a restart", [first["s"], rest], ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
