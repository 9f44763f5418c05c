"""Hostile and heavy clients against a real server on loopback (issue 11): malformed input,
cost limits, failed requests that change nothing, ownership, keepalive, admission, redaction,
and a bounded fuzz run."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from fuzz_harness import fuzz
from onnx_fixtures import CHARS, build_rnn, build_zoo

from rnnzoo.errors import FailedPrecondition
from rnnzoo.proto.tensors import from_tensor, to_tensor
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc
from rnnzoo.server.runtime import ModelRepository, Runtime, RuntimeOptions
from rnnzoo.server.transport import RnnzooServer, ServerConfig
from rnnzoo.server.transport.admission import AdmissionLimits

Code = grpc.StatusCode
TOL = 1e-5
SERVICE = "/rnnzoo.v1.Rnnzoo/"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    refs = build_zoo(d)
    # a model whose contract records where its checkpoint was (an absolute server path)
    build_rnn(
        d / "prov.onnx",
        cell="gru",
        seed=9,
        name="prov",
        extra_contract={
            "source": {
                "checkpoint": "/srv/secret/runs/prov/model.pt",
                "checkpoint_sha256": "ab" * 32,
            }
        },
    )
    return d, refs


async def _server(zoo, config: dict | None = None, **options) -> RnnzooServer:
    options.setdefault("session_ttl_s", None)
    server = RnnzooServer(ServerConfig(port=0, grace_s=0.5, **(config or {})))
    await server.start()
    await server.load(Runtime.from_dir(zoo[0], RuntimeOptions(**options)))
    return server


@pytest.fixture
async def served(zoo):
    server = await _server(zoo)
    async with grpc.aio.insecure_channel(
        server.target, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        yield server, ch, pb_grpc.RnnzooStub(ch)
    await server.stop(0.5)


async def _expect(code: Code, coro, *needles: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    err = info.value
    assert err.code() == code, err.details()
    for n in needles:
        assert n in err.details(), err.details()
    return err.details()


async def _consume(call):
    return [r async for r in call]


def _x(steps: int, seed: int = 0, features: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, features)).astype(np.float32)


async def _new(stub, model: str) -> str:
    return (await stub.CreateSession(pb.CreateSessionRequest(model=model))).session_id


async def _steps_total(stub, sid: str, x1: np.ndarray, name: str = "x") -> int:
    """Where the session stands: stream one more step and read steps_total back (minus it)."""
    resp = await _consume(
        stub.Stream(
            _aiter(pb.StreamRequest(session_id=sid, request_id=7, inputs={name: to_tensor(x1)}))
        )
    )
    return resp[-1].steps_total - len(x1)


async def _aiter(*items):
    for item in items:
        yield item


# ---- 1. malformed input: INVALID_ARGUMENT, never UNKNOWN or INTERNAL ---------------------------
@pytest.mark.parametrize(
    "rpc", ["ListModels", "GetModel", "CreateSession", "CloseSession", "ResetSession", "Infer"]
)
async def test_undecodable_bytes_on_unary_rpcs_are_invalid_argument(served, rpc):
    _, ch, _ = served
    call = ch.unary_unary(SERVICE + rpc)  # raw bytes both ways
    for junk in (b"\xff\xff\xff", b"\x0a\xff", b"\x12\x80\x80\x80\x80\x10"):
        await _expect(Code.INVALID_ARGUMENT, call(junk), "not a valid rnnzoo.v1.", "Request")


async def test_undecodable_bytes_on_streams_are_invalid_argument(served):
    _, ch, stub = served
    gen = ch.unary_stream(SERVICE + "Generate")
    await _expect(Code.INVALID_ARGUMENT, _consume(gen(b"\xff\xff")), "rnnzoo.v1.GenerateRequest")
    # a corrupt message in the middle of a Stream: the earlier chunk was answered and applied,
    # the stream ends with INVALID_ARGUMENT naming the message, the session carries on
    sid = await _new(stub, "gru")
    call = ch.stream_stream(SERVICE + "Stream")()
    good = pb.StreamRequest(session_id=sid, request_id=1, inputs={"x": to_tensor(_x(2))})
    await call.write(good.SerializeToString())
    assert pb.StreamResponse.FromString(await call.read()).steps_total == 2
    await call.write(b"\x0a\xff\xff")
    await _expect(Code.INVALID_ARGUMENT, call.read(), "rnnzoo.v1.StreamRequest")
    assert await _steps_total(stub, sid, _x(1)) == 2


ABSURD = [[0, 2**62], [0, 2**31, 2**31, 2**31], [-1, 3], [2**62], [1] * 17]


async def test_absurd_shapes_are_invalid_argument_everywhere(served):
    _, _, stub = served
    sid = await _new(stub, "gru")
    for shape in ABSURD:
        t = pb.Tensor(dtype="float32", shape=shape)
        await _expect(
            Code.INVALID_ARGUMENT, stub.Infer(pb.InferRequest(model="gru", inputs={"x": t}))
        )
        await _expect(
            Code.INVALID_ARGUMENT,
            stub.CreateSession(pb.CreateSessionRequest(model="gru", initial_state={"h0": t})),
        )
        req = pb.StreamRequest(session_id=sid, request_id=3, inputs={"x": t})
        await _expect(Code.INVALID_ARGUMENT, _consume(stub.Stream(_aiter(req))), "request_id=3")
    await _expect(
        Code.INVALID_ARGUMENT,
        stub.Infer(
            pb.InferRequest(model="gru", inputs={"x": pb.Tensor(dtype="float32", shape=[0, 2**62])})
        ),
        "absurdly large",
    )
    assert await _steps_total(stub, sid, _x(1)) == 0


async def test_generate_seed_and_sampling_edges(served):
    _, _, stub = served

    def gen(**kw):
        return _consume(stub.Generate(pb.GenerateRequest(model="charlm", prompt="ab", **kw)))

    await _expect(Code.INVALID_ARGUMENT, gen(max_tokens=3, seed=-1), "seed must be >= 0")
    await _expect(Code.INVALID_ARGUMENT, gen(max_tokens=3, seed=-(2**63)), "seed")
    assert len(await gen(max_tokens=3, seed=2**63 - 1)) == 3
    for t in (1e-45, 3.4e38):  # tiny: greedy in effect; huge: uniform; neither NaN
        assert len(await gen(max_tokens=3, seed=1, temperature=t)) == 3
    await _expect(Code.INVALID_ARGUMENT, gen(max_tokens=3, temperature=float("nan")), "temperature")
    assert len(await gen(max_tokens=3, top_k=2**31 - 1, seed=0)) == 3


# ---- 2. every cost bounded before compute --------------------------------------------------------
async def test_output_bytes_are_refused_before_compute(zoo):
    # the drill: 1 MB of token ids that would return 36 MB of logits
    server = await _server(zoo, max_request_steps=10**7)
    big = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    try:
        async with grpc.aio.insecure_channel(server.target, options=big) as ch:
            stub = pb_grpc.RnnzooStub(ch)
            t0 = time.perf_counter()
            msg = await _expect(
                Code.RESOURCE_EXHAUSTED,
                stub.Infer(
                    pb.InferRequest(model="charlm", tokens=pb.TokenIds(ids=[5] * 1_000_000))
                ),
                "would return 36000000 bytes of outputs",
                "send at most",
            )
            assert time.perf_counter() - t0 < 5  # refused, not computed
            fit = int(msg.split("send at most ")[1].split()[0])
            limit = server.runtime.catalog.max_output_bytes  # capped to the message size
            assert fit == limit // (len(CHARS) * 4)  # the advice is exact: fit steps pass
            ok = await stub.Infer(
                pb.InferRequest(model="charlm", tokens=pb.TokenIds(ids=[5] * fit))
            )
            assert from_tensor(ok.outputs["logits"]).shape == (1, fit, len(CHARS))
    finally:
        await server.stop(0.5)


async def test_step_and_token_limits_say_how_to_stay_under_them(zoo):
    server = await _server(zoo, max_request_steps=500, max_generate_tokens=20, max_buffer_steps=50)
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RnnzooStub(ch)
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                stub.Infer(pb.InferRequest(model="gru", inputs={"x": to_tensor(_x(501)[None])})),
                "501 steps",
                "send at most 500 steps",
            )
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                stub.Infer(
                    pb.InferRequest(
                        model="gru", inputs={"x": to_tensor(np.zeros((2, 300, 3), np.float32))}
                    )
                ),
                "batch x time",
            )
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                stub.Infer(pb.InferRequest(model="charlm", text="a" * 501)),
                "this text has 501 steps",
            )
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                stub.Infer(pb.InferRequest(model="charlm", tokens=pb.TokenIds(ids=[1] * 501))),
                "tokens has 501 steps",
            )
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                _consume(
                    stub.Generate(pb.GenerateRequest(model="charlm", prompt="ab", max_tokens=21))
                ),
                "limit of 20 generated tokens",
            )
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                _consume(
                    stub.Generate(
                        pb.GenerateRequest(model="charlm", prompt="a" * 501, max_tokens=2)
                    )
                ),
                "this prompt has 501 steps",
            )
            sid = await _new(stub, "bigru")
            req = pb.StreamRequest(session_id=sid, request_id=1, inputs={"x": to_tensor(_x(51))})
            await _expect(
                Code.RESOURCE_EXHAUSTED, _consume(stub.Stream(_aiter(req))), "max_buffer_steps=50"
            )
    finally:
        await server.stop(0.5)


async def test_a_refused_request_does_not_outlive_its_call(zoo):
    # grpc keeps the AbortError of an aborted call past the call, and with it the error it
    # replaced; their tracebacks' frames held the decoded request: a refused 5 M-token Infer
    # kept ~110 MB for good (docs/reliability.md). The frames must be gone after the call.
    import gc
    import types

    def live_frames() -> list[str]:
        names = ("token_inputs", "request_inputs", "Infer", "Stream")
        return [
            o.f_code.co_name
            for o in gc.get_objects()
            if type(o) is types.FrameType and o.f_code.co_name in names
        ]

    server = await _server(zoo, max_request_steps=500)
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RnnzooStub(ch)
            for _ in range(3):
                big = pb.InferRequest(model="charlm", tokens=pb.TokenIds(ids=[1] * 100_000))
                await _expect(Code.RESOURCE_EXHAUSTED, stub.Infer(big), "tokens has 100000 steps")
                await _expect(
                    Code.NOT_FOUND,
                    stub.Infer(pb.InferRequest(model="nosuch", text="ab")),
                    "no model",
                )
                sid = await _new(stub, "gru")
                bad = pb.StreamRequest(session_id=sid, inputs={"x": to_tensor(_x(501))})
                await _expect(
                    Code.RESOURCE_EXHAUSTED, _consume(stub.Stream(_aiter(bad))), "501 steps"
                )
            await asyncio.sleep(0.1)
            gc.collect()
            assert live_frames() == []
    finally:
        await server.stop(0.5)


async def test_legitimate_zoo_work_passes_the_default_limits(served):
    _, _, stub = served
    x = _x(10_000, seed=3)
    whole = from_tensor(
        (await stub.Infer(pb.InferRequest(model="gru", inputs={"x": to_tensor(x[None])}))).outputs[
            "y"
        ]
    )[0]
    sid = await _new(stub, "gru")
    reqs = [
        pb.StreamRequest(session_id=sid, request_id=i, inputs={"x": to_tensor(c)})
        for i, c in enumerate(np.array_split(x, 10))
    ]
    got = np.concatenate(
        [from_tensor(r.outputs["y"]) for r in await _consume(stub.Stream(_aiter(*reqs)))]
    )
    np.testing.assert_allclose(got, whole, atol=TOL)
    one = pb.StreamRequest(
        session_id=await _new(stub, "gru"), request_id=0, inputs={"x": to_tensor(x)}
    )
    assert (await _consume(stub.Stream(_aiter(one))))[0].steps_total == 10_000
    bi = pb.StreamRequest(
        session_id=await _new(stub, "bigru"), request_id=0, inputs={"x": to_tensor(x)}
    )
    assert (await _consume(stub.Stream(_aiter(bi))))[0].steps_total == 10_000
    pieces = await _consume(
        stub.Generate(pb.GenerateRequest(model="charlm", prompt="ab", max_tokens=1000, seed=1))
    )
    assert len(pieces) == 1000  # charlm has no eos: it always runs to max_tokens


# ---- 3. a request answered with an error changes nothing -------------------------------------------
async def test_failed_requests_change_no_session(zoo):
    server = await _server(zoo)
    try:
        async with grpc.aio.insecure_channel(
            server.target, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as ch:
            stub = pb_grpc.RnnzooStub(ch)
            sid = await _new(stub, "charlm")
            first = pb.StreamRequest(session_id=sid, request_id=0, text="abc")
            assert (await _consume(stub.Stream(_aiter(first))))[0].steps_total == 3
            # Stream: a 200,000-token chunk is refused and the session stays at 3 steps
            big = pb.StreamRequest(
                session_id=sid, request_id=1, tokens=pb.TokenIds(ids=[5] * 200_000)
            )
            await _expect(
                Code.RESOURCE_EXHAUSTED, _consume(stub.Stream(_aiter(big))), "request_id=1"
            )
            # Infer(advance): the same
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                stub.Infer(
                    pb.InferRequest(
                        model="charlm",
                        session_id=sid,
                        advance=True,
                        tokens=pb.TokenIds(ids=[5] * 200_000),
                    )
                ),
            )
            # Generate: a refused or cancelled generation touches no session and holds nothing
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                _consume(
                    stub.Generate(pb.GenerateRequest(model="charlm", prompt="ab", max_tokens=10**6))
                ),
            )
            gen = stub.Generate(pb.GenerateRequest(model="charlm", prompt="ab", max_tokens=4000))
            await gen.read()
            gen.cancel()
            # Learned only after compute: a response over the message size (the limit is
            # lowered here under the predicted output bytes). Stream and Infer(advance) both
            # roll back.
            server.servicer.max_response_bytes = 2000
            mid = pb.StreamRequest(session_id=sid, request_id=2, text="abcdefgh" * 20)
            await _expect(
                Code.RESOURCE_EXHAUSTED, _consume(stub.Stream(_aiter(mid))), "the response would be"
            )
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                stub.Infer(
                    pb.InferRequest(
                        model="charlm", session_id=sid, advance=True, text="abcdefgh" * 20
                    )
                ),
                "the response would be",
            )
            server.servicer.max_response_bytes = 16 << 20
            last = pb.StreamRequest(session_id=sid, request_id=3, text="d")
            (resp,) = await _consume(stub.Stream(_aiter(last)))
            assert (resp.start, resp.steps_total) == (3, 4)
            want = await stub.Infer(pb.InferRequest(model="charlm", text="abcd"))
            np.testing.assert_allclose(
                from_tensor(resp.outputs["logits"]),
                from_tensor(want.outputs["logits"])[0, 3:],
                atol=TOL,
            )
            for _ in range(100):
                if server.admission.rpcs == 0:
                    break
                await asyncio.sleep(0.02)
            assert (server.admission.rpcs, server.admission.streams) == (0, 0)
    finally:
        await server.stop(0.5)


# ---- 4. ownership: a stream's lease ----------------------------------------------------------------
async def test_attached_session_refuses_advance_reset_and_close(served):
    _, _, stub = served
    x = _x(6, seed=5)
    sid = await _new(stub, "gru")
    call = stub.Stream()
    await call.write(pb.StreamRequest(session_id=sid, request_id=0, inputs={"x": to_tensor(x[:2])}))
    await call.read()
    adv = pb.InferRequest(
        model="gru", session_id=sid, advance=True, inputs={"x": to_tensor(x[None, 2:4])}
    )
    await _expect(
        Code.FAILED_PRECONDITION,
        stub.Infer(adv),
        "attached to an open stream",
        "Infer(advance=true)",
    )
    await _expect(
        Code.FAILED_PRECONDITION,
        stub.ResetSession(pb.ResetSessionRequest(session_id=sid)),
        "ResetSession",
    )
    await _expect(
        Code.FAILED_PRECONDITION,
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid)),
        "CloseSession",
    )
    peek = await stub.Infer(
        pb.InferRequest(model="gru", session_id=sid, inputs={"x": to_tensor(x[None, 2:4])})
    )
    await call.write(
        pb.StreamRequest(session_id=sid, request_id=1, inputs={"x": to_tensor(x[2:4])})
    )
    r = await call.read()
    assert (r.start, r.steps_total) == (2, 4)  # the refusals changed nothing
    np.testing.assert_allclose(
        from_tensor(r.outputs["y"]), from_tensor(peek.outputs["y"])[0], atol=TOL
    )
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    await stub.Infer(
        adv.__class__(
            model="gru", session_id=sid, advance=True, inputs={"x": to_tensor(x[None, 4:])}
        )
    )
    assert await _steps_total(stub, sid, x[:1]) == 6
    await stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
    await stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def repo(zoo):
    return ModelRepository.from_dir(zoo[0])


async def test_a_dead_holders_lease_runs_out_and_is_fenced(repo):
    clock = Clock()
    rt = Runtime(repo, RuntimeOptions(lease_ttl_s=10, session_ttl_s=100), clock=clock)
    await rt.start()
    try:
        sid = (await rt.create_session("gru")).id
        dead = await rt.attach(sid, "stream-a", alive=lambda: False)
        with pytest.raises(FailedPrecondition, match=r"runs out in 10\.0 s"):
            await rt.attach(sid, "stream-b")
        clock.t += 6
        assert rt.renew_leases() == 0  # not alive: not renewed
        with pytest.raises(FailedPrecondition, match=r"runs out in 4\.0 s"):
            await rt.attach(sid, "stream-b")
        # the old holder computes a step; its lease runs out and moves on before the commit
        async with rt.stepping(sid, {"x": _x(3)}, dead) as res:
            assert res.steps_total == 3  # (stepping renewed the lease: 10 s from now)
            clock.t += 11
            new = await rt.attach(sid, "stream-b")
            assert new.epoch == dead.epoch + 1
        with pytest.raises(FailedPrecondition, match=r"lease on session .* ran out"):
            await rt.step(sid, {"x": _x(1)}, dead)
        r = await rt.step(sid, {"x": _x(2)}, new)
        assert (r.start, r.steps_total) == (0, 2)  # the fenced step never landed
        assert rt.renew_leases() == 1  # alive=None: renewed while attached
        rt.detach(sid, dead)  # a stale detach releases nothing
        with pytest.raises(FailedPrecondition):
            await rt.attach(sid, "stream-c")
    finally:
        await rt.stop()


def test_failed_attaches_do_not_refresh_the_idle_ttl():
    from rnnzoo.server.runtime.sessions import SessionStore

    clock = Clock()
    store = SessionStore(ttl_s=10, clock=clock, lease_ttl_s=1000)
    s = store.create("m", {})
    store.attach(s.id, "a")
    for _ in range(2):
        clock.t += 4
        with pytest.raises(FailedPrecondition):
            store.attach(s.id, "b")
    clock.t += 3
    assert store.sweep() == 1  # idle 11 s since the only successful attach


# ---- 5. keepalive: a frozen peer's stream ends and its session frees -------------------------------
FROZEN_CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    import grpc, numpy as np
    from rnnzoo.proto.tensors import to_tensor
    from rnnzoo.proto.v1 import rnnzoo_pb2 as pb, rnnzoo_pb2_grpc as pb_grpc

    async def main(target, sid):
        async with grpc.aio.insecure_channel(target) as ch:
            call = pb_grpc.RnnzooStub(ch).Stream()
            x = np.zeros((1, 3), np.float32)
            await call.write(pb.StreamRequest(session_id=sid, inputs={"x": to_tensor(x)}))
            await call.read()
            print("attached", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_a_frozen_peer_is_detected_and_its_session_frees(zoo, tmp_path):
    cfg = {"keepalive_time_s": 0.3, "keepalive_timeout_s": 0.5, "min_client_ping_interval_s": 0.1}
    server = await _server(zoo, cfg, lease_ttl_s=60)  # freed by keepalive, long before 60 s
    script = tmp_path / "frozen.py"
    script.write_text(FROZEN_CLIENT)
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RnnzooStub(ch)
            sid = await _new(stub, "gru")
            child = subprocess.Popen(
                [sys.executable, str(script), server.target, sid],
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(Path.cwd())},
            )
            try:
                line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
                assert line.strip() == b"attached"
                os.kill(child.pid, signal.SIGSTOP)  # socket open, process frozen
                frozen_at = time.monotonic()
                await _expect(
                    Code.FAILED_PRECONDITION,
                    _steps_total(stub, sid, _x(1)),
                    "already attached",
                    "lease runs out in",
                )
                while True:
                    try:
                        steps = await _steps_total(stub, sid, _x(1))
                        break
                    except grpc.aio.AioRpcError as err:
                        assert err.code() == Code.FAILED_PRECONDITION, err.details()
                        assert time.monotonic() - frozen_at < 20, "keepalive never fired"
                        await asyncio.sleep(0.1)
                assert steps == 1  # the frozen client's one step, then ours
            finally:
                child.kill()
                child.wait()
    finally:
        await server.stop(0.5)


# ---- 6. overload is explicit ------------------------------------------------------------------------
async def test_a_burst_of_creates_is_never_silently_cancelled(zoo):
    server = await _server(zoo)
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RnnzooStub(ch)

            async def one():
                try:
                    await stub.CreateSession(pb.CreateSessionRequest(model="gru"), timeout=120)
                    return "OK", ""
                except grpc.aio.AioRpcError as err:
                    return err.code().name, err.details()

            results = await asyncio.gather(*(one() for _ in range(3000)))
    finally:
        await server.stop(0.5)
    codes = [c for c, _ in results]
    assert "CANCELLED" not in codes  # grpc's default pending limit dropped ~1/3 of these
    assert all(d for c, d in results if c != "OK")
    assert codes.count("OK") == 3000


async def test_admission_limits_refuse_with_a_message(zoo):
    limits = AdmissionLimits(max_rpcs=50, max_streams=3, max_streams_per_connection=2)
    server = await _server(zoo, {"admission": limits})
    try:
        async with (
            grpc.aio.insecure_channel(server.target) as a,
            grpc.aio.insecure_channel(
                server.target, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as b,
        ):
            sa, sb = pb_grpc.RnnzooStub(a), pb_grpc.RnnzooStub(b)
            open_calls = []
            for stub in (sa, sa):
                call = stub.Stream()
                sid = await _new(stub, "gru")
                await call.write(pb.StreamRequest(session_id=sid, inputs={"x": to_tensor(_x(1))}))
                await call.read()
                open_calls.append(call)
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                _steps_total(sa, await _new(sa, "gru"), _x(1)),
                "max_streams_per_connection",
            )
            third = sb.Stream()
            await third.write(
                pb.StreamRequest(session_id=await _new(sb, "gru"), inputs={"x": to_tensor(_x(1))})
            )
            await third.read()
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                _steps_total(sb, await _new(sb, "gru"), _x(1)),
                "maximum of 3 open streams",
            )
            for call in [*open_calls, third]:
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
            assert await _steps_total(sa, await _new(sa, "gru"), _x(1)) == 0  # slots came back
    finally:
        await server.stop(0.5)


# ---- 7. security hygiene ------------------------------------------------------------------------------
async def test_no_server_paths_whole_ids_or_unbounded_echoes(served, caplog):
    _, _, stub = served
    prov = await stub.GetModel(pb.GetModelRequest(name="prov"))
    contract = json.loads(prov.graphs[0].contract_json)
    assert contract["source"]["checkpoint"] == "model.pt"
    assert "/srv/secret" not in prov.SerializeToString().decode("utf-8", "replace")
    assert contract["source"]["checkpoint_sha256"] == "ab" * 32
    with caplog.at_level(logging.INFO, logger="rnnzoo"):
        sid = await _new(stub, "gru")
        assert await _steps_total(stub, sid, _x(1)) == 0
        await stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
        await _expect(Code.NOT_FOUND, stub.ResetSession(pb.ResetSessionRequest(session_id=sid)))
    logged = "\n".join(
        json.dumps(getattr(r, "fields", {})) + r.getMessage() for r in caplog.records
    )
    assert sid[:6] in logged and sid not in logged
    long = "é" * 100_000
    for coro in (
        stub.GetModel(pb.GetModelRequest(name=long)),
        stub.CreateSession(pb.CreateSessionRequest(model=long)),
        stub.CloseSession(pb.CloseSessionRequest(session_id=long)),
        stub.Infer(pb.InferRequest(model="charlm", text="".join(map(chr, range(0x100, 0x2100))))),
        stub.Infer(pb.InferRequest(model="gru", inputs={long: to_tensor(_x(1)[None])})),
        stub.Infer(pb.InferRequest(model="gru", inputs={"x": pb.Tensor(dtype=long)})),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await coro
        assert len(info.value.details()) < 600, info.value.details()[:200]


# ---- 8. bounded fuzz run ---------------------------------------------------------------------------------
async def test_fuzz_2000_hostile_requests(zoo):
    server = await _server(zoo)
    try:
        report = await fuzz(server.target, 2000, seed=11, rounds=10, concurrency=16)
    finally:
        await server.stop(0.5)
    summary = report.summary()
    assert report.requests == 2000
    assert not report.bad, summary["bad"]  # no UNKNOWN, no INTERNAL
    assert not report.silent, summary["silent"]
    assert len(report.canaries) == 3 and all(e <= TOL for e in report.canaries.values()), summary
    assert set(summary["by_rpc"]) == {
        "ListModels",
        "GetModel",
        "CreateSession",
        "CloseSession",
        "ResetSession",
        "Infer",
        "Stream",
        "Generate",
    }
