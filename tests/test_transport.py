"""The grpc.aio transport against the real runtime, on a loopback ephemeral port."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from onnx_fixtures import CHARS, build_zoo, reference

from rnnzoo.proto.tensors import from_tensor, to_tensor
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc
from rnnzoo.server.runtime import Runtime, RuntimeOptions
from rnnzoo.server.transport import RnnzooServer, ServerConfig
from rnnzoo.server.transport.interceptors import ErrorInterceptor

Code = grpc.StatusCode
TOL = 1e-5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    return d, build_zoo(d)


async def _server(model_dir, **config) -> RnnzooServer:
    server = RnnzooServer(ServerConfig(port=0, **config))
    await server.start()
    await server.load(Runtime.from_dir(model_dir, RuntimeOptions(session_ttl_s=None)))
    return server


@pytest.fixture
async def stub(zoo):
    server = await _server(zoo[0], grace_s=0.5)
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield pb_grpc.RnnzooStub(channel)
    await server.stop(0.5)


def _signal(steps: int, seed: int, features: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, features)).astype(np.float32)


async def _offline(stub, model: str, x: np.ndarray, name: str = "x") -> np.ndarray:
    resp = await stub.Infer(pb.InferRequest(model=model, inputs={name: to_tensor(x[None])}))
    return from_tensor(next(iter(resp.outputs.values())))[0]


async def _stream(stub, sid: str, chunks: list[np.ndarray], name: str = "x", first_id: int = 0):
    """Send every chunk over one Stream call; return the responses."""

    async def requests():
        for i, c in enumerate(chunks):
            yield pb.StreamRequest(
                session_id=sid, request_id=first_id + i, inputs={name: to_tensor(c)}
            )

    return [r async for r in stub.Stream(requests())]


def _joined(responses, name: str = "y") -> np.ndarray:
    return np.concatenate([from_tensor(r.outputs[name]) for r in responses])


async def _expect(code: Code, coro, *needles: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    err = info.value
    assert err.code() == code, err.details()
    for n in needles:
        assert n in err.details(), err.details()
    return err.details()


# ---- models ----------------------------------------------------------------------------------
async def test_list_and_get_models(stub):
    names = [m.name for m in (await stub.ListModels(pb.ListModelsRequest())).models]
    assert names == ["bigru", "charlm", "gru", "kws", "lstm2", "rev", "rnn"]
    lstm = await stub.GetModel(pb.GetModelRequest(name="lstm2"))
    assert (lstm.task, lstm.streamable) == ("forecast", True)
    (graph,) = lstm.graphs
    assert [i.name for i in graph.inputs] == ["x"]
    assert [(d.symbol or d.size) for d in graph.inputs[0].shape] == ["batch", "time", 3]
    assert [(s.input, s.output) for s in graph.states] == [("h0", "hn"), ("c0", "cn")]
    assert json.loads(graph.contract_json)["name"] == "lstm2"
    charlm = await stub.GetModel(pb.GetModelRequest(name="charlm"))
    assert list(charlm.vocab) == CHARS
    rev = await stub.GetModel(pb.GetModelRequest(name="rev"))
    assert [g.role for g in rev.graphs] == ["encoder", "decoder"]
    assert rev.special_tokens["eos"] == 2 and list(rev.target_vocab)[3:] == list("abcd")
    assert not (await stub.GetModel(pb.GetModelRequest(name="bigru"))).streamable
    await _expect(Code.NOT_FOUND, stub.GetModel(pb.GetModelRequest(name="nope")), "lstm2")


# ---- streaming equals offline ------------------------------------------------------------------
@pytest.mark.parametrize("model", ["lstm2", "gru", "rnn"])
async def test_stream_steps_and_chunks_equal_offline(stub, zoo, model):
    x = _signal(13, seed=1)
    offline = await _offline(stub, model, x)
    ref, _ = reference(zoo[1][model], x[None].astype(np.float64))
    np.testing.assert_allclose(offline, ref[0], atol=TOL)
    for chunks in ([x[t : t + 1] for t in range(13)], [x[:4], x[4:5], x[5:11], x[11:]]):
        sid = (await stub.CreateSession(pb.CreateSessionRequest(model=model))).session_id
        resp = await _stream(stub, sid, chunks)
        assert [r.request_id for r in resp] == list(range(len(chunks)))
        assert [r.start for r in resp] == list(np.cumsum([0] + [len(c) for c in chunks])[:-1])
        assert resp[-1].steps_total == 13 and not any(r.revised for r in resp)
        np.testing.assert_allclose(_joined(resp), offline, atol=TOL)


async def test_text_and_token_inputs(stub):
    text = "abc hgf"
    ids = np.array([CHARS.index(c) for c in text], np.int64)
    by_tensor = await stub.Infer(
        pb.InferRequest(model="charlm", inputs={"tokens": to_tensor(ids[None])})
    )
    by_text = await stub.Infer(pb.InferRequest(model="charlm", text=text))
    by_ids = await stub.Infer(pb.InferRequest(model="charlm", tokens=pb.TokenIds(ids=ids.tolist())))
    want = from_tensor(by_tensor.outputs["logits"])
    assert want.shape == (1, 7, len(CHARS))
    for r in (by_text, by_ids):
        np.testing.assert_array_equal(from_tensor(r.outputs["logits"]), want)
    sid = (await stub.CreateSession(pb.CreateSessionRequest(model="charlm"))).session_id

    async def requests():
        yield pb.StreamRequest(session_id=sid, request_id=1, text=text[:3])
        yield pb.StreamRequest(
            session_id=sid, request_id=2, tokens=pb.TokenIds(ids=ids[3:].tolist())
        )

    resp = [r async for r in stub.Stream(requests())]
    np.testing.assert_allclose(_joined(resp, "logits"), want[0], atol=TOL)


async def test_bidirectional_stream_is_revised_prefix(stub):
    x = _signal(9, seed=2)
    sid = (await stub.CreateSession(pb.CreateSessionRequest(model="bigru"))).session_id
    resp = await _stream(stub, sid, [x[:4], x[4:9]])
    assert [(r.start, r.steps_total, r.revised) for r in resp] == [(0, 4, True), (0, 9, True)]
    np.testing.assert_allclose(
        from_tensor(resp[0].outputs["y"]), await _offline(stub, "bigru", x[:4]), atol=TOL
    )
    np.testing.assert_allclose(
        from_tensor(resp[1].outputs["y"]), await _offline(stub, "bigru", x), atol=TOL
    )


async def test_external_model_with_initial_state(stub, zoo):
    x = _signal(6, seed=3, features=4)
    init = np.full((1, 5), 0.7, np.float32)  # kws: state (batch, 1, H), batch-free (1, H)
    req = pb.CreateSessionRequest(model="kws", initial_state={"state_in": to_tensor(init)})
    sid = (await stub.CreateSession(req)).session_id
    got = _joined(await _stream(stub, sid, [x[:2], x[2:]], name="features"), "scores")
    from onnx_fixtures import reference_external

    want, _ = reference_external(
        zoo[1]["kws"], x[None].astype(np.float64), init[None].astype(np.float64)
    )
    np.testing.assert_allclose(got, want[0], atol=TOL)


# ---- sessions: disconnect, resume, one stream at a time -------------------------------------------
async def test_disconnect_then_resume_by_id(stub):
    x = _signal(10, seed=4)
    offline = await _offline(stub, "lstm2", x)
    sid = (await stub.CreateSession(pb.CreateSessionRequest(model="lstm2"))).session_id
    call = stub.Stream()
    got = []
    for t in range(4):
        await call.write(
            pb.StreamRequest(session_id=sid, request_id=t, inputs={"x": to_tensor(x[t : t + 1])})
        )
        got.append(from_tensor((await call.read()).outputs["y"]))
    call.cancel()  # the client goes away without closing
    for _ in range(50):  # the server notices the disconnect and detaches
        try:
            rest = await _stream(stub, sid, [x[4:7], x[7:]], first_id=4)
            break
        except grpc.aio.AioRpcError as err:
            assert err.code() == Code.FAILED_PRECONDITION
            await asyncio.sleep(0.02)
    assert rest[0].start == 4
    np.testing.assert_allclose(np.concatenate([*got, _joined(rest)]), offline, atol=TOL)


async def test_second_attach_is_refused_until_the_first_stream_ends(stub):
    x = _signal(3, seed=5)
    sid = (await stub.CreateSession(pb.CreateSessionRequest(model="gru"))).session_id
    first = stub.Stream()
    await first.write(
        pb.StreamRequest(session_id=sid, request_id=0, inputs={"x": to_tensor(x[:1])})
    )
    await first.read()
    second = _stream(stub, sid, [x[1:2]])
    await _expect(Code.FAILED_PRECONDITION, second, "already attached", "request_id=0")
    await first.write(
        pb.StreamRequest(session_id=sid, request_id=1, inputs={"x": to_tensor(x[1:2])})
    )
    assert (await first.read()).steps_total == 2  # the refusal changed nothing
    await first.done_writing()
    assert await first.read() == grpc.aio.EOF
    assert (await _stream(stub, sid, [x[2:]]))[0].steps_total == 3


async def test_interleaved_sessions_equal_one_at_a_time(stub):
    n, steps = 8, 12
    xs = [_signal(steps, seed=100 + i) for i in range(n)]
    alone = [await _offline(stub, "lstm2", x) for x in xs]
    sids = [
        (await stub.CreateSession(pb.CreateSessionRequest(model="lstm2"))).session_id for _ in xs
    ]

    async def run(i: int) -> np.ndarray:
        call = stub.Stream()
        outs = []
        for t in range(0, steps, 3):
            await call.write(
                pb.StreamRequest(
                    session_id=sids[i], request_id=t, inputs={"x": to_tensor(xs[i][t : t + 3])}
                )
            )
            outs.append(from_tensor((await call.read()).outputs["y"]))
            await asyncio.sleep(0)  # let the other sessions interleave
        await call.done_writing()
        return np.concatenate(outs)

    together = await asyncio.gather(*(run(i) for i in range(n)))
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_allclose(got, want, atol=TOL)


async def test_reset_close_and_infer_from_session(stub):
    x = _signal(8, seed=6)
    offline = await _offline(stub, "gru", x)
    sid = (await stub.CreateSession(pb.CreateSessionRequest(model="gru"))).session_id
    await _stream(stub, sid, [x[:3]])
    resp = await stub.Infer(
        pb.InferRequest(
            model="gru", inputs={"x": to_tensor(x[None, 3:5])}, session_id=sid, advance=True
        )
    )
    np.testing.assert_allclose(from_tensor(resp.outputs["y"])[0], offline[3:5], atol=TOL)
    rest = await _stream(stub, sid, [x[5:]])
    assert rest[0].start == 5
    np.testing.assert_allclose(_joined(rest), offline[5:], atol=TOL)
    await stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
    again = await _stream(stub, sid, [x])
    assert again[0].start == 0
    np.testing.assert_allclose(_joined(again), offline, atol=TOL)
    await stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    # session ids are secrets: errors (and logs) show only a short prefix
    msg = await _expect(
        Code.NOT_FOUND, stub.ResetSession(pb.ResetSessionRequest(session_id=sid)), sid[:6]
    )
    assert sid not in msg
    await _expect(Code.NOT_FOUND, _stream(stub, sid, [x]), sid[:6])


# ---- bad input -------------------------------------------------------------------------------------
def _t(dtype="float32", shape=(1, 3), data=None) -> pb.Tensor:
    n = int(np.prod(shape)) * np.dtype(dtype if dtype != "bogus" else "float32").itemsize
    return pb.Tensor(dtype=dtype, shape=list(shape), data=b"\0" * n if data is None else data)


BAD_STREAM = [
    ({"inputs": {"x": _t(data=b"\0" * 5)}}, Code.INVALID_ARGUMENT, "needs 12"),
    ({"inputs": {"x": _t(dtype="bogus")}}, Code.INVALID_ARGUMENT, "unknown dtype 'bogus'"),
    ({"inputs": {"x": _t(shape=(-1, 3), data=b"")}}, Code.INVALID_ARGUMENT, "dims must be >= 0"),
    ({"inputs": {"x": _t(shape=(2, 4))}}, Code.INVALID_ARGUMENT, "dim 1 must be 3"),
    ({"inputs": {"x": _t(shape=(1, 1, 3))}}, Code.INVALID_ARGUMENT, "rank"),
    ({"inputs": {"z": _t()}}, Code.INVALID_ARGUMENT, "unknown ['z']"),
    ({"inputs": {"x": _t(dtype="int64")}}, Code.INVALID_ARGUMENT, "expected dtype float32"),
    (
        {"inputs": {"x": to_tensor(np.full((1, 3), np.nan, np.float32))}},
        Code.INVALID_ARGUMENT,
        "NaN",
    ),
    ({"text": "abc"}, Code.INVALID_ARGUMENT, "does not take text"),
    ({}, Code.INVALID_ARGUMENT, "exactly one of inputs, text or tokens"),
    ({"inputs": {"x": _t()}, "text": "a"}, Code.INVALID_ARGUMENT, "exactly one"),
]


async def test_bad_requests_get_their_code_and_change_nothing(stub):
    x, other_x = _signal(6, seed=7), _signal(6, seed=8)
    offline, other_offline = (
        await _offline(stub, "lstm2", x),
        await _offline(stub, "lstm2", other_x),
    )
    sid = (await stub.CreateSession(pb.CreateSessionRequest(model="lstm2"))).session_id
    other = (await stub.CreateSession(pb.CreateSessionRequest(model="lstm2"))).session_id
    got = _joined(await _stream(stub, sid, [x[:2]]))
    other_got = _joined(await _stream(stub, other, [other_x[:2]]))
    for kw, code, needle in BAD_STREAM:
        bad = pb.StreamRequest(session_id=sid, request_id=99, **kw)

        async def requests(bad=bad):
            yield bad

        await _expect(code, _consume(stub.Stream(requests())), needle, "request_id=99")
    # both sessions carry on as if nothing happened
    got = np.concatenate([got, _joined(await _stream(stub, sid, [x[2:]]))])
    other_got = np.concatenate([other_got, _joined(await _stream(stub, other, [other_x[2:]]))])
    np.testing.assert_allclose(got, offline, atol=TOL)
    np.testing.assert_allclose(other_got, other_offline, atol=TOL)


async def _consume(call):
    return [r async for r in call]


async def test_bad_unary_requests(stub):
    sess = pb.CreateSessionRequest
    cases = [
        (stub.CreateSession(sess(model="nope")), Code.NOT_FOUND, "known models"),
        (stub.CreateSession(sess(model="")), Code.INVALID_ARGUMENT, "model is empty"),
        (
            stub.CreateSession(sess(model="gru", initial_state={"h9": _t()})),
            Code.INVALID_ARGUMENT,
            "h9",
        ),
        (
            stub.CreateSession(sess(model="gru", initial_state={"h0": _t(shape=(2, 2))})),
            Code.INVALID_ARGUMENT,
            "h0",
        ),
        (stub.CreateSession(sess(model="rev")), Code.FAILED_PRECONDITION, "seq2seq"),
        (
            stub.CloseSession(pb.CloseSessionRequest(session_id="x" * 32)),
            Code.NOT_FOUND,
            "no session 'xxxxxx…'",
        ),
        (
            stub.Infer(pb.InferRequest(model="charlm", text="xyz!")),
            Code.INVALID_ARGUMENT,
            "not in the vocabulary",
        ),
        (
            stub.Infer(pb.InferRequest(model="charlm", tokens=pb.TokenIds(ids=[0, 99]))),
            Code.INVALID_ARGUMENT,
            "token ids",
        ),
        (
            stub.Infer(pb.InferRequest(model="gru", inputs={"x": _t(shape=(1, 2, 3), data=b"1")})),
            Code.INVALID_ARGUMENT,
            "bytes",
        ),
        (
            stub.Infer(
                pb.InferRequest(model="gru", inputs={"x": _t(shape=(1, 2, 3))}, advance=True)
            ),
            Code.INVALID_ARGUMENT,
            "session_id",
        ),
        (
            _consume(stub.Generate(pb.GenerateRequest(model="charlm", prompt="ab", max_tokens=0))),
            Code.INVALID_ARGUMENT,
            "max_tokens",
        ),
        (
            _consume(
                stub.Generate(
                    pb.GenerateRequest(model="charlm", prompt="ab", max_tokens=3, temperature=-1)
                )
            ),
            Code.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            _consume(stub.Generate(pb.GenerateRequest(model="charlm", prompt="AB", max_tokens=3))),
            Code.INVALID_ARGUMENT,
            "'A'",
        ),
        (
            _consume(stub.Generate(pb.GenerateRequest(model="gru", prompt="ab", max_tokens=3))),
            Code.FAILED_PRECONDITION,
            "does not generate",
        ),
    ]
    for coro, code, needle in cases:
        await _expect(code, coro, needle)


async def _with_options(zoo, test, **options) -> None:
    """Run ``test(stub)`` against a server whose runtime has these options."""
    server = RnnzooServer(ServerConfig(port=0))
    await server.start()
    await server.load(Runtime.from_dir(zoo[0], RuntimeOptions(**options)))
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            await test(pb_grpc.RnnzooStub(ch))
    finally:
        await server.stop(0.5)


async def test_capacity_is_resource_exhausted(zoo):
    async def test(stub):
        for _ in range(2):
            await stub.CreateSession(pb.CreateSessionRequest(model="gru"))
        await _expect(
            Code.RESOURCE_EXHAUSTED,
            stub.CreateSession(pb.CreateSessionRequest(model="gru")),
            "2",
        )

    await _with_options(zoo, test, max_sessions=2)


async def test_eviction_over_grpc_drops_the_least_recent_session_and_says_so(zoo):
    """At --max-sessions with --on-full evict, a new session evicts the least recently used
    one; the evicted id answers NOT_FOUND saying why, the others keep their exact state."""
    x = _signal(4, seed=12)

    async def test(stub):
        a, b = [
            (await stub.CreateSession(pb.CreateSessionRequest(model="gru"))).session_id
            for _ in range(2)
        ]
        first = await _stream(stub, a, [x[:2]])  # a is now more recent than b
        await stub.CreateSession(pb.CreateSessionRequest(model="gru"))  # evicts b
        msg = await _expect(
            Code.NOT_FOUND,
            _stream(stub, b, [x[:1]]),
            "evicted",
            "least recently used",
            "create a new session",
        )
        assert b[:6] in msg and b not in msg
        rest = await _stream(stub, a, [x[2:]], first_id=1)  # a's state survived the eviction
        assert rest[0].start == 2
        got = np.concatenate([from_tensor(r.outputs["y"]) for r in first + rest])
        np.testing.assert_allclose(got, await _offline(stub, "gru", x), atol=TOL)

    await _with_options(zoo, test, max_sessions=2, on_full="evict", session_ttl_s=None)


async def test_create_session_takes_a_shorter_ttl_and_refuses_a_longer_one(zoo):
    async def test(stub):
        default = await stub.CreateSession(pb.CreateSessionRequest(model="gru"))
        short = await stub.CreateSession(pb.CreateSessionRequest(model="gru", ttl_s=0.2))
        assert (default.ttl_s, short.ttl_s) == (60, 0.2)
        await _expect(
            Code.INVALID_ARGUMENT,
            stub.CreateSession(pb.CreateSessionRequest(model="gru", ttl_s=61)),
            "longer than this server's session TTL of 60 s",
        )
        await _expect(
            Code.INVALID_ARGUMENT,
            stub.CreateSession(pb.CreateSessionRequest(model="gru", ttl_s=-1)),
            "positive",
        )
        await asyncio.sleep(0.4)
        await _expect(
            Code.NOT_FOUND,
            _stream(stub, short.session_id, [_signal(1, 0)]),
            "expired after 0.2 s idle",
        )
        assert len(await _stream(stub, default.session_id, [_signal(1, 0)])) == 1

    await _with_options(zoo, test, session_ttl_s=60, sweep_interval_s=0.05)


async def test_idle_session_expires_over_grpc_with_a_clear_not_found(zoo):
    """A session idle longer than the TTL is swept; its id then answers NOT_FOUND with when
    and why, on Stream and on CloseSession alike. A session in use does not expire."""
    x = _signal(3, seed=13)

    async def test(stub):
        idle = (await stub.CreateSession(pb.CreateSessionRequest(model="gru"))).session_id
        busy = (await stub.CreateSession(pb.CreateSessionRequest(model="gru"))).session_id
        for i in range(6):  # 0.6 s: busy is used every 0.1 s, idle never
            await _stream(stub, busy, [x[:1]], first_id=i)
            await asyncio.sleep(0.1)
        await _expect(Code.NOT_FOUND, _stream(stub, idle, [x[:1]]), "expired after 0.3 s idle")
        await _expect(
            Code.NOT_FOUND, stub.CloseSession(pb.CloseSessionRequest(session_id=idle)), "expired"
        )
        more = await _stream(stub, busy, [x[1:]], first_id=6)
        assert more[0].start == 6

    await _with_options(zoo, test, session_ttl_s=0.3, sweep_interval_s=0.05)


# ---- generation --------------------------------------------------------------------------------
async def test_generate_lm_and_seq2seq(stub):
    def gen(**kw):
        return _consume(stub.Generate(pb.GenerateRequest(max_tokens=12, **kw)))

    a = await gen(model="charlm", prompt="abc", seed=7)
    b = await gen(model="charlm", prompt="abc", seed=7)
    assert [p.index for p in a] == list(range(len(a))) and 1 <= len(a) <= 12
    assert [p.text for p in a] == [p.text for p in b]  # a seed fixes the sampling
    assert all(p.text in CHARS for p in a)
    greedy = await gen(model="charlm", prompt="abc", temperature=0)
    assert [p.text for p in greedy] == [
        p.text for p in await gen(model="charlm", prompt="abc", temperature=0, seed=1)
    ]
    rev = await gen(model="rev", prompt="abc", temperature=0)
    assert len(rev) <= 12 and all(p.text in list("abcd") for p in rev)  # no pad/bos ever


# ---- errors nothing maps: INTERNAL, logged ----------------------------------------------------------
async def test_unexpected_exception_is_internal_and_logged(caplog):
    async def boom(request, context):
        raise ZeroDivisionError("secret detail")

    handler = grpc.method_handlers_generic_handler(
        "rnnzoo.v1.Rnnzoo", {"Boom": grpc.unary_unary_rpc_method_handler(boom)}
    )
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/rnnzoo.v1.Rnnzoo/Boom")
            with caplog.at_level(logging.ERROR, logger="rnnzoo"):
                details = await _expect(Code.INTERNAL, call(b""), "ZeroDivisionError")
    finally:
        await server.stop(0)
    assert "secret detail" not in details
    rec = next(r for r in caplog.records if r.exc_info)
    assert rec.exc_info[0] is ZeroDivisionError and rec.fields["rpc"] == "Boom"


# ---- health, reflection, limits, shutdown ------------------------------------------------------------
async def test_health_follows_the_lifecycle(zoo):
    server = RnnzooServer(ServerConfig(port=0, grace_s=2))
    await server.start()
    async with grpc.aio.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        stub = pb_grpc.RnnzooStub(ch)
        S = health_pb2.HealthCheckResponse
        for service in ("", "rnnzoo.v1.Rnnzoo"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == S.NOT_SERVING
        await _expect(Code.UNAVAILABLE, stub.ListModels(pb.ListModelsRequest()), "loading")
        await server.load(Runtime.from_dir(zoo[0]))
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == S.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="rnnzoo.v1.Rnnzoo"))
        assert (await watch.read()).status == S.SERVING
        # an open stream keeps working during the grace period; new calls are refused
        sid = (await stub.CreateSession(pb.CreateSessionRequest(model="gru"))).session_id
        x = _signal(2, seed=9)
        call = stub.Stream()
        await call.write(
            pb.StreamRequest(session_id=sid, request_id=0, inputs={"x": to_tensor(x[:1])})
        )
        await call.read()
        stopping = asyncio.create_task(server.stop())
        assert (await watch.read()).status == S.NOT_SERVING
        await asyncio.sleep(0.1)
        await _expect(Code.UNAVAILABLE, stub.ListModels(pb.ListModelsRequest(), timeout=5))
        await call.write(
            pb.StreamRequest(session_id=sid, request_id=1, inputs={"x": to_tensor(x[1:])})
        )
        assert (await call.read()).steps_total == 2
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        await asyncio.wait_for(stopping, 5)  # returns once in-flight calls are done


async def test_reflection_lists_the_service(stub, zoo):
    server = await _server(zoo[0])
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def requests():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
                yield reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="rnnzoo.v1.Rnnzoo"
                )

            listed, files = [r async for r in refl.ServerReflectionInfo(requests())]
    finally:
        await server.stop(0.5)
    names = {s.name for s in listed.list_services_response.service}
    assert {"rnnzoo.v1.Rnnzoo", "grpc.health.v1.Health"} <= names
    assert files.file_descriptor_response.file_descriptor_proto


async def test_max_message_size(zoo):
    server = await _server(zoo[0], max_message_mb=0.01)  # ~10 KB
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.RnnzooStub(ch)
            big = np.zeros((1, 1000, 3), np.float32)  # 12 KB of data
            await _expect(
                Code.RESOURCE_EXHAUSTED,
                stub.Infer(pb.InferRequest(model="gru", inputs={"x": to_tensor(big)})),
            )
            small = await stub.Infer(
                pb.InferRequest(model="gru", inputs={"x": to_tensor(big[:, :10])})
            )
            assert from_tensor(small.outputs["y"]).shape == (1, 10, 2)
    finally:
        await server.stop(0.5)


async def test_port_in_use_is_a_clear_error(stub, zoo):
    first = await _server(zoo[0])
    try:
        second = RnnzooServer(ServerConfig(port=first.port))
        from rnnzoo.errors import FailedPrecondition

        with pytest.raises(FailedPrecondition, match="--port"):
            await second.start()
    finally:
        await first.stop(0.5)
