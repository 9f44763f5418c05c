"""A hostile client for an rnnzoo server: malformed and absurd requests across every RPC, with
canary sessions streamed in between whose outputs must equal an offline replay.

    python tests/fuzz_harness.py --target 127.0.0.1:50051 --requests 10000 [--seed 0]

prints the status-code histogram and the canary verdict as JSON, and exits 1 when any request
got UNKNOWN or INTERNAL, a failure came without a message, or a canary drifted. The test suite
runs a bounded version (tests/test_hardening.py) against a server on a loopback port.

Requests travel as raw bytes (identity serializers), so undecodable messages reach the server
exactly as written. Hostile requests never name a canary session: a *valid* Infer(advance)
on one would legitimately move it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import struct
import sys
from dataclasses import dataclass, field

import grpc
import numpy as np

from rnnzoo.proto.tensors import from_tensor, to_tensor
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb

SERVICE = "/rnnzoo.v1.Rnnzoo/"
UNARY = ["ListModels", "GetModel", "CreateSession", "CloseSession", "ResetSession", "Infer"]
BAD_CODES = ("UNKNOWN", "INTERNAL")
TOL = 1e-5


@dataclass
class Report:
    codes: collections.Counter = field(default_factory=collections.Counter)
    by_rpc: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    bad: list = field(default_factory=list)  # (rpc, code, details, what) of UNKNOWN/INTERNAL
    silent: list = field(default_factory=list)  # failures without a message
    canaries: dict = field(default_factory=dict)  # name -> max abs error vs offline
    requests: int = 0

    @property
    def ok(self) -> bool:
        drift = any(not e <= TOL for e in self.canaries.values())
        return not self.bad and not self.silent and not drift

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "codes": dict(self.codes.most_common()),
            "by_rpc": {k: dict(v) for k, v in sorted(self.by_rpc.items())},
            "bad": self.bad[:20],
            "silent": self.silent[:20],
            "canary_max_abs_error": self.canaries,
            "ok": self.ok,
        }


# ---- hostile values ------------------------------------------------------------------------
def _junk(rng: np.random.Generator, lo: int = 0, hi: int = 200) -> bytes:
    return rng.bytes(int(rng.integers(lo, hi)))


def _mutate(rng: np.random.Generator, data: bytes) -> bytes:
    """Flip, cut or splice bytes of a valid message."""
    b = bytearray(data)
    op = rng.integers(4)
    if op == 0 and b:
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
    elif op == 1 and b:
        b = b[: int(rng.integers(len(b)))]
    elif op == 2:
        b[int(rng.integers(len(b) + 1)) : 0] = _junk(rng, 1, 16)
    else:
        b += b"\xff" * int(rng.integers(1, 8))
    return bytes(b)


def _name(rng: np.random.Generator, models: list[str]) -> str:
    pick = rng.integers(6)
    if pick == 0:
        return ""
    if pick == 1:
        return "x" * int(rng.integers(1, 100_000))
    if pick == 2:
        return "".join(chr(int(c)) for c in rng.integers(0x20, 0x2FFF, 30))
    if pick == 3:
        return str(rng.choice(models)) + "\u0000"
    return str(rng.choice(models))


_SHAPES = [
    [0, 2**62],
    [0, 2**31, 2**31, 2**31],
    [-1, 3],
    [2**62],
    [1] * 17,
    [0],
    [],
    [0, 0, 0],
    [1, 2**40],
    [3, -5],
    [1, 1, 3],
    [1, 3],
    [2, 3],
    [1, 1, 1, 3],
    [9223372036854775807],
]
_DTYPES = ["float32", "float64", "float16", "int64", "int32", "bool", "", "complex128", "é" * 300]
_FLOATS = [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 0.0, -0.0, 1e-320, -1.0]


def _tensor(rng: np.random.Generator) -> pb.Tensor:
    shape = list(_SHAPES[int(rng.integers(len(_SHAPES)))])
    dtype = _DTYPES[int(rng.integers(len(_DTYPES)))]
    t = pb.Tensor(dtype=dtype, shape=shape)
    n = math.prod(shape) if shape and min(shape) >= 0 and math.prod(shape) < 4096 else 0
    itemsize = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2}.get(dtype, 1)
    kind = rng.integers(4)
    if kind == 0:  # the right number of bytes, hostile values
        vals = [rng.choice(_FLOATS) for _ in range(n)]
        t.data = b"".join(struct.pack("<d", v) for v in vals)[: n * itemsize].ljust(
            n * itemsize, b"\xff"
        )
    elif kind == 1:
        t.data = _junk(rng, 0, 64)
    elif kind == 2:
        t.data = b"\xff" * (n * itemsize)
    return t


def _inputs(rng: np.random.Generator) -> dict[str, pb.Tensor]:
    names = ["x", "tokens", "features", "z", "", "h0", "é" * 200]
    return {str(rng.choice(names)): _tensor(rng) for _ in range(int(rng.integers(0, 3)))}


def _tokens(rng: np.random.Generator) -> pb.TokenIds:
    pick = rng.integers(4)
    if pick == 0:
        return pb.TokenIds(ids=[-1, 2**63 - 1, -(2**63)])
    if pick == 1:
        return pb.TokenIds(ids=[5] * int(rng.integers(100_000, 1_000_000)))
    if pick == 2:
        return pb.TokenIds()
    return pb.TokenIds(ids=rng.integers(-5, 20, int(rng.integers(1, 50))).tolist())


def _text(rng: np.random.Generator) -> str:
    pick = rng.integers(4)
    if pick == 0:
        return "".join(chr(int(c)) for c in rng.integers(0x20, 0xD7FF, int(rng.integers(1, 500))))
    if pick == 1:
        return "a" * int(rng.integers(100_000, 2_000_000))
    if pick == 2:
        return ""
    return "abc hgf"


def _structured(rng, rpc: str, models: list[str], victim: str) -> pb.Message:
    sid = str(rng.choice([victim, "", "nope", "x" * 5000, victim + "x", victim[:-1]]))
    if rpc == "ListModels":
        return pb.ListModelsRequest()
    if rpc == "GetModel":
        return pb.GetModelRequest(name=_name(rng, models))
    if rpc == "CreateSession":
        req = pb.CreateSessionRequest(model=_name(rng, models))
        for k, v in _inputs(rng).items():
            req.initial_state[k].CopyFrom(v)
        if rng.integers(2):
            req.ttl_s = float(rng.choice(_FLOATS))
        return req
    if rpc in ("CloseSession", "ResetSession"):
        cls = pb.CloseSessionRequest if rpc == "CloseSession" else pb.ResetSessionRequest
        return cls(session_id=sid)
    if rpc == "Infer":
        req = pb.InferRequest(model=_name(rng, models), advance=bool(rng.integers(2)))
        pick = rng.integers(4)
        if pick == 0:
            for k, v in _inputs(rng).items():
                req.inputs[k].CopyFrom(v)
        elif pick == 1:
            req.tokens.CopyFrom(_tokens(rng))
        elif pick == 2:
            req.text = _text(rng)
        if rng.integers(2):
            req.session_id = sid
        return req
    if rpc == "Generate":
        req = pb.GenerateRequest(
            model=_name(rng, models),
            prompt=_text(rng) if rng.integers(2) else "ab",
            max_tokens=int(rng.choice([-1, 0, 1, 3, 2**31 - 1, 100_000])),
            top_k=int(rng.choice([-5, 0, 2, 2**31 - 1])),
        )
        if rng.integers(2):
            req.seed = int(rng.choice([-1, -(2**63), 2**63 - 1, 0, 7]))
        if rng.integers(2):
            req.temperature = float(rng.choice([*_FLOATS, 1e-45, 3.4e38]))
        return req
    # Stream
    req = pb.StreamRequest(session_id=sid, request_id=int(rng.integers(0, 2**63)))
    pick = rng.integers(3)
    if pick == 0:
        for k, v in _inputs(rng).items():
            req.inputs[k].CopyFrom(v)
    elif pick == 1:
        req.tokens.CopyFrom(_tokens(rng))
    else:
        req.text = _text(rng)
    return req


def hostile_case(rng, models: list[str], victim: str) -> tuple[str, list[bytes]]:
    """One hostile request: (rpc, request bytes; several for Stream)."""
    rpc = str(rng.choice([*UNARY, "Stream", "Generate"]))
    count = int(rng.integers(1, 4)) if rpc == "Stream" else 1
    out = []
    for _ in range(count):
        how = rng.integers(3)
        if how == 0:
            out.append(_junk(rng))
        else:
            data = _structured(rng, rpc, models, victim).SerializeToString()
            out.append(_mutate(rng, data) if how == 1 else data)
    return rpc, out


# ---- the run ----------------------------------------------------------------------------------
class Fuzzer:
    def __init__(self, channel: grpc.aio.Channel, seed: int = 0, timeout: float = 30.0):
        self.ch = channel
        self.rng = np.random.default_rng(seed)
        self.timeout = timeout
        self.report = Report()

    def _record(self, rpc: str, code: str, details: str, what: str) -> None:
        self.report.codes[code] += 1
        self.report.by_rpc[rpc][code] += 1
        self.report.requests += 1
        if code in BAD_CODES:
            self.report.bad.append((rpc, code, details[:300], what[:200]))
        elif code != "OK" and not details:
            self.report.silent.append((rpc, code, what[:200]))

    async def send(self, rpc: str, payload: list[bytes]) -> None:
        what = repr(payload[0][:80])
        try:
            if rpc == "Stream":
                # One response per request, so read each before the next write: a client
                # that writes after the server ended the call gets a client-side INTERNAL
                # ("Internal error from Core", grpc/grpc#36066) that the server never sent.
                call = self.ch.stream_stream(SERVICE + rpc)(timeout=self.timeout)
                for p in payload:
                    await call.write(p)
                    if await call.read() is grpc.aio.EOF:
                        break
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
            elif rpc == "Generate":
                async for _ in self.ch.unary_stream(SERVICE + rpc)(
                    payload[0], timeout=self.timeout
                ):
                    pass
            else:
                await self.ch.unary_unary(SERVICE + rpc)(payload[0], timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            self._record(rpc, err.code().name, err.details() or "", what)
            return
        self._record(rpc, "OK", "", what)

    async def run(
        self, n: int, canaries: list[Canary], concurrency: int = 16, rounds: int = 10
    ) -> Report:
        """``n`` hostile requests in ``rounds`` rounds; each canary streams one chunk per
        round, while the round's hostile requests are in flight."""
        models = [m.name for m in (await self._list()).models]
        victim = await self._victim(models)
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                await self.send(*hostile_case(self.rng, models, victim))

        per_round = math.ceil(n / rounds)
        sent = 0
        for r in range(rounds):
            k = min(per_round, n - sent)
            sent += k
            await asyncio.gather(
                *(one() for _ in range(k)), *(c.feed(self.ch, r) for c in canaries)
            )
        for c in canaries:
            self.report.canaries[c.model] = await c.check(self.ch)
        return self.report

    async def _list(self):
        call = self.ch.unary_unary(
            SERVICE + "ListModels",
            request_serializer=pb.ListModelsRequest.SerializeToString,
            response_deserializer=pb.ListModelsResponse.FromString,
        )
        return await call(pb.ListModelsRequest(), timeout=self.timeout)

    async def _victim(self, models: list[str]) -> str:
        call = self.ch.unary_unary(
            SERVICE + "CreateSession",
            request_serializer=pb.CreateSessionRequest.SerializeToString,
            response_deserializer=pb.Session.FromString,
        )
        for m in models:
            try:
                return (
                    await call(pb.CreateSessionRequest(model=m), timeout=self.timeout)
                ).session_id
            except grpc.aio.AioRpcError:
                continue
        return "no-victim"


class Canary:
    """A session fed one chunk of a known sequence per round over a fresh Stream; at the end,
    its outputs must equal stateless Infer of the whole sequence (the offline replay)."""

    def __init__(self, model: str, seq: np.ndarray, rounds: int, input_name: str = "x"):
        self.model, self.seq, self.name = model, seq, input_name
        self.chunks = np.array_split(seq, rounds)
        self.outputs: list[np.ndarray] = []
        self.sid: str | None = None

    async def feed(self, ch: grpc.aio.Channel, r: int) -> None:
        if self.sid is None:
            create = ch.unary_unary(
                SERVICE + "CreateSession",
                request_serializer=pb.CreateSessionRequest.SerializeToString,
                response_deserializer=pb.Session.FromString,
            )
            self.sid = (await create(pb.CreateSessionRequest(model=self.model))).session_id
        stream = ch.stream_stream(
            SERVICE + "Stream",
            request_serializer=pb.StreamRequest.SerializeToString,
            response_deserializer=pb.StreamResponse.FromString,
        )
        req = pb.StreamRequest(
            session_id=self.sid, request_id=r, inputs={self.name: to_tensor(self.chunks[r])}
        )

        async def one():
            yield req

        async for resp in stream(one()):
            assert resp.start == sum(len(c) for c in self.chunks[:r]), (resp.start, r)
            self.outputs.append(from_tensor(next(iter(resp.outputs.values()))))

    async def check(self, ch: grpc.aio.Channel) -> float:
        infer = ch.unary_unary(
            SERVICE + "Infer",
            request_serializer=pb.InferRequest.SerializeToString,
            response_deserializer=pb.InferResponse.FromString,
        )
        req = pb.InferRequest(model=self.model, inputs={self.name: to_tensor(self.seq[None])})
        offline = from_tensor(next(iter((await infer(req)).outputs.values())))[0]
        got = np.concatenate(self.outputs)
        if got.shape != offline.shape:
            return float("inf")
        return float(np.max(np.abs(got - offline)))


async def fuzz(target: str, n: int, seed: int = 0, rounds: int = 10, concurrency: int = 16):
    """Run against ``target`` with float canaries for the models that take ``x`` (B, T, F)."""
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        fz = Fuzzer(ch, seed)
        canaries = []
        for m in (await fz._list()).models:
            if not m.streamable or m.task == "seq2seq" or not m.graphs:
                continue
            inp = m.graphs[0].inputs
            if len(inp) != 1 or inp[0].dtype != "float32" or not inp[0].shape[-1].size:
                continue
            x = np.random.default_rng(seed).normal(size=(40, inp[0].shape[-1].size))
            canaries.append(Canary(m.name, x.astype(np.float32), rounds, inp[0].name))
        return await fz.run(n, canaries[:3], concurrency, rounds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    report = asyncio.run(fuzz(args.target, args.requests, args.seed, concurrency=args.concurrency))
    print(json.dumps(report.summary(), indent=1, default=str))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
