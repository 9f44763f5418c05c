"""KServe v2 / Triton gRPC (inference.GRPCInferenceService) against the real runtime, on a
loopback port, with stubs generated from Triton's protos. tritonclient itself:
tests/test_kserve_tritonclient.py."""

from __future__ import annotations

import asyncio
import itertools
import struct

import grpc
import numpy as np
import pytest
from onnx_fixtures import CHARS, build_zoo, reference

from rnnzoo.proto.inference.v2 import grpc_service_pb2 as kpb
from rnnzoo.proto.inference.v2 import grpc_service_pb2_grpc as kgrpc
from rnnzoo.proto.inference.v2 import model_config_pb2 as mc
from rnnzoo.proto.tensors import to_tensor
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc
from rnnzoo.server.runtime import Runtime, RuntimeOptions
from rnnzoo.server.transport import RnnzooServer, ServerConfig

Code = grpc.StatusCode
TOL = 1e-5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    return d, build_zoo(d)


async def _server(model_dir, **options) -> RnnzooServer:
    server = RnnzooServer(ServerConfig(port=0, grace_s=0.5))
    await server.start()
    opts = {"session_ttl_s": None, **options}
    await server.load(Runtime.from_dir(model_dir, RuntimeOptions(**opts)))
    return server


@pytest.fixture
async def server(zoo):
    server = await _server(zoo[0])
    yield server
    await server.stop(0.5)


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield kgrpc.GRPCInferenceServiceStub(channel)


def _signal(steps: int, seed: int, features: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, features)).astype(np.float32)


def _request(model: str, x: np.ndarray, seq=0, start=False, end=False, name="x", rid=""):
    """A ModelInferRequest as tritonclient builds it: raw contents, sequence parameters only
    with a non-zero id."""
    req = kpb.ModelInferRequest(model_name=model, id=rid)
    dt = {np.float32: "FP32", np.float64: "FP64", np.int64: "INT64"}[x.dtype.type]
    req.inputs.add(name=name, datatype=dt, shape=list(x.shape))
    req.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    if seq not in (0, ""):
        if isinstance(seq, str):
            req.parameters["sequence_id"].string_param = seq
        else:
            req.parameters["sequence_id"].int64_param = seq
        req.parameters["sequence_start"].bool_param = start
        req.parameters["sequence_end"].bool_param = end
    return req


def _out(resp, name: str = "y") -> np.ndarray:
    for i, t in enumerate(resp.outputs):
        if t.name == name:
            dt = {"FP32": np.float32, "INT64": np.int64}[t.datatype]
            return np.frombuffer(resp.raw_output_contents[i], dt).reshape(list(t.shape))
    raise KeyError(name)


async def _expect(code: Code, coro, *needles: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value.details()
    for n in needles:
        assert n in info.value.details(), info.value.details()
    return info.value.details()


# ---- health and metadata -----------------------------------------------------------------
async def test_health_metadata_and_config(stub):
    assert (await stub.ServerLive(kpb.ServerLiveRequest())).live
    assert (await stub.ServerReady(kpb.ServerReadyRequest())).ready
    assert (await stub.ModelReady(kpb.ModelReadyRequest(name="lstm2"))).ready
    assert not (await stub.ModelReady(kpb.ModelReadyRequest(name="nope"))).ready
    assert not (await stub.ModelReady(kpb.ModelReadyRequest(name="lstm2", version="7"))).ready
    meta = await stub.ServerMetadata(kpb.ServerMetadataRequest())
    assert meta.name == "rnnzoo" and "sequence" in meta.extensions
    m = await stub.ModelMetadata(kpb.ModelMetadataRequest(name="lstm2"))
    assert (m.name, list(m.versions), m.platform) == ("lstm2", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [("x", "FP32", [-1, -1, 3])]
    assert [t.name for t in m.outputs] == ["y"]  # states stay implicit
    charlm = await stub.ModelMetadata(kpb.ModelMetadataRequest(name="charlm"))
    assert [(t.name, t.datatype, list(t.shape)) for t in charlm.inputs] == [
        ("tokens", "INT64", [-1, -1])
    ]
    cfg = (await stub.ModelConfig(kpb.ModelConfigRequest(name="lstm2"))).config
    assert cfg.max_batch_size == 64 and list(cfg.input[0].dims) == [-1, 3]
    assert cfg.input[0].data_type == mc.TYPE_FP32
    assert cfg.HasField("sequence_batching")
    states = [(s.input_name, s.output_name, list(s.dims)) for s in cfg.sequence_batching.state]
    assert [s[:2] for s in states] == [("h0", "hn"), ("c0", "cn")]
    assert all(len(s[2]) == 2 and -1 not in s[2] for s in states)  # (L*D, H): no batch
    assert cfg.parameters["streamable"].string_value == "true"
    assert '"name": "lstm2"' in cfg.parameters["rnnzoo.contract"].string_value
    rev = (await stub.ModelConfig(kpb.ModelConfigRequest(name="rev"))).config
    assert not rev.HasField("sequence_batching")
    assert "Generate" in rev.parameters["inference"].string_value
    await _expect(Code.NOT_FOUND, stub.ModelMetadata(kpb.ModelMetadataRequest(name="nope")))
    await _expect(
        Code.NOT_FOUND, stub.ModelConfig(kpb.ModelConfigRequest(name="lstm2", version="2"))
    )


async def test_unimplemented_rpcs_say_what_to_use_instead(stub):
    await _expect(
        Code.UNIMPLEMENTED,
        stub.SystemSharedMemoryRegister(kpb.SystemSharedMemoryRegisterRequest(name="r")),
        "raw_input_contents",
    )
    await _expect(Code.UNIMPLEMENTED, stub.LogSettings(kpb.LogSettingsRequest()), "--log-level")
    await _expect(Code.UNIMPLEMENTED, stub.TraceSetting(kpb.TraceSettingRequest()), "metrics")
    # nothing registered is a true answer, not an error
    assert not (await stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest())).regions


async def test_health_answers_for_the_kserve_service_name_as_triton_does(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_stream_responses_carry_triton_final_response(stub):
    x = _signal(2, seed=4)[None]
    bad = _request("gru", x, seq=99)  # no sequence_start: an in-band error
    resps = [r async for r in stub.ModelStreamInfer(iter([_request("gru", x), bad]))]
    assert not resps[0].error_message and resps[1].error_message.startswith("NOT_FOUND")
    for r in resps:
        assert r.infer_response.parameters["triton_final_response"].bool_param


async def test_model_statistics_has_tritons_breakdown_and_counts_executions(stub):
    x = _signal(3, seed=5)[None]
    before = (await stub.ModelStatistics(kpb.ModelStatisticsRequest(name="gru"))).model_stats
    for _ in range(3):
        await stub.ModelInfer(_request("gru", x.repeat(2, axis=0)))  # 2 inferences, 1 execution
    after = (await stub.ModelStatistics(kpb.ModelStatisticsRequest(name="gru"))).model_stats
    (b,) = before or [kpb.ModelStatistics()]
    (a,) = after
    assert a.version == "1"
    assert a.inference_count - b.inference_count == 6
    assert a.execution_count - b.execution_count == 3
    for stage in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        got, was = getattr(a.inference_stats, stage), getattr(b.inference_stats, stage)
        assert got.count - was.count == 3, stage  # equal counts: perf_analyzer requires it
    assert a.inference_stats.compute_infer.ns > b.inference_stats.compute_infer.ns


async def test_repository_index_lists_every_version_ready(stub):
    index = await stub.RepositoryIndex(kpb.RepositoryIndexRequest())
    assert {(m.name, m.version, m.state) for m in index.models} >= {
        ("gru", "1", "READY"),
        ("lstm2", "1", "READY"),
    }
    # without --model-control explicit, loading is refused with the reason
    await _expect(
        Code.FAILED_PRECONDITION,
        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="gru")),
        "--model-control explicit",
    )


async def test_a_wrong_datatype_and_unsupported_features_are_refused(stub):
    x = _signal(4, seed=2)[None]
    req = _request("gru", x.astype(np.float64))
    await _expect(Code.INVALID_ARGUMENT, stub.ModelInfer(req), "FP64", "FP32")
    req = _request("gru", x)
    req.outputs.add(name="y").parameters["classification"].int64_param = 3
    await _expect(Code.INVALID_ARGUMENT, stub.ModelInfer(req), "class_count=3")
    req = _request("gru", x)
    req.inputs[0].parameters["shared_memory_region"].string_param = "r0"
    await _expect(Code.INVALID_ARGUMENT, stub.ModelInfer(req), "shared memory")
    req = _request("gru", x)
    req.parameters["priority"].uint64_param = 2
    await _expect(Code.INVALID_ARGUMENT, stub.ModelInfer(req), "priority")
    req = _request("gru", x)
    req.parameters["timeout"].int64_param = 1000
    await _expect(Code.INVALID_ARGUMENT, stub.ModelInfer(req), "deadline")
    req = _request("gru", x)
    req.parameters["priority"].uint64_param = 0  # the default, as tritonclient may send it
    await stub.ModelInfer(req)


# ---- stateless inference -----------------------------------------------------------------
@pytest.mark.parametrize("model", ["lstm2", "gru", "rnn"])
async def test_infer_without_sequence_equals_reference(stub, zoo, model):
    x = _signal(9, seed=1)[None].repeat(2, axis=0)  # a batch of 2
    x[1] *= -1
    resp = await stub.ModelInfer(_request(model, x, rid="req-7"))
    assert resp.id == "req-7" and resp.model_name == model and resp.model_version == "1"
    assert not resp.outputs[0].contents.fp32_contents  # raw only, as tritonclient reads
    ref, _ = reference(zoo[1][model], x.astype(np.float64))
    np.testing.assert_allclose(_out(resp), ref, atol=TOL)
    assert "start" not in resp.parameters


async def test_typed_contents_are_accepted_too(stub):
    x = _signal(4, seed=2)[None]
    req = kpb.ModelInferRequest(model_name="gru")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4, 3])
    req.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    a = _out(await stub.ModelInfer(req))
    b = _out(await stub.ModelInfer(_request("gru", x)))
    np.testing.assert_array_equal(a, b)


def _bytes_tensor(texts: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)


async def test_text_as_bytes_input(stub):
    text = "abc hgf"
    ids = np.array([[CHARS.index(c) for c in text]], np.int64)
    by_ids = _out(await stub.ModelInfer(_request("charlm", ids, name="tokens")), "logits")
    req = kpb.ModelInferRequest(model_name="charlm")
    req.inputs.add(name="tokens", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(_bytes_tensor([text]))
    by_text = _out(await stub.ModelInfer(req), "logits")
    np.testing.assert_array_equal(by_text, by_ids)
    # a sequence, fed text in two pieces, equals the whole
    pieces = []
    for i, part in enumerate([text[:3], text[3:]]):
        r = kpb.ModelInferRequest(model_name="charlm")
        r.inputs.add(name="text", datatype="BYTES", shape=[1])
        r.raw_input_contents.append(_bytes_tensor([part]))
        r.parameters["sequence_id"].string_param = "doc-1"
        r.parameters["sequence_start"].bool_param = i == 0
        r.parameters["sequence_end"].bool_param = i == 1
        pieces.append(_out(await stub.ModelInfer(r), "logits"))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), by_ids, atol=TOL)
    bad = kpb.ModelInferRequest(model_name="charlm")
    bad.inputs.add(name="tokens", datatype="BYTES", shape=[1])
    bad.raw_input_contents.append(_bytes_tensor(["xyz"]))
    await _expect(Code.INVALID_ARGUMENT, stub.ModelInfer(bad), "'x'")
    bad.model_name = "gru"
    await _expect(Code.INVALID_ARGUMENT, stub.ModelInfer(bad), "does not take text")


# ---- sequences ----------------------------------------------------------------------------
async def _sequence(stub, model, x, seq, chunks, name="x"):
    outs = []
    bounds = np.cumsum([0, *chunks])
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        req = _request(model, x[None, a:b], seq, i == 0, i == len(chunks) - 1, name)
        outs.append(await stub.ModelInfer(req))
    return outs


@pytest.mark.parametrize("seq", [42, "user-7:utt-3"])
async def test_sequence_over_model_infer_equals_whole(stub, seq):
    x = _signal(11, seed=3)
    whole = _out(await stub.ModelInfer(_request("lstm2", x[None])))
    outs = await _sequence(stub, "lstm2", x, seq, [1, 4, 6])
    np.testing.assert_allclose(np.concatenate([_out(r) for r in outs], axis=1), whole, atol=TOL)
    starts = [
        (
            r.parameters["start"].int64_param,
            r.parameters["steps_total"].int64_param,
            r.parameters["revised"].bool_param,
        )
        for r in outs
    ]
    assert starts == [(0, 1, False), (1, 5, False), (5, 11, False)]
    # ended: the id is free and says so
    details = await _expect(Code.NOT_FOUND, stub.ModelInfer(_request("lstm2", x[None, :1], seq)))
    assert "ended by sequence_end" in details and "sequence_start" in details


async def test_unknown_id_without_start_is_not_found(stub):
    x = _signal(2, seed=4)[None]
    await _expect(
        Code.NOT_FOUND,
        stub.ModelInfer(_request("gru", x, 9)),
        "no active sequence 9",
        "sequence_start=true",
    )
    # int 5 and string "5" are different sequences
    await stub.ModelInfer(_request("gru", x, 5, start=True))
    await _expect(Code.NOT_FOUND, stub.ModelInfer(_request("gru", x, "5")))
    # id 0 is no sequence: flags make no sense there
    req = _request("gru", x)
    req.parameters["sequence_start"].bool_param = True
    await _expect(Code.INVALID_ARGUMENT, stub.ModelInfer(req), "need a sequence_id")


async def test_start_on_active_id_restarts_and_failed_requests_change_nothing(stub):
    x = _signal(8, seed=5)
    whole = _out(await stub.ModelInfer(_request("gru", x[None])))
    await stub.ModelInfer(_request("gru", _signal(3, seed=9)[None], 77, start=True))
    # a restart that fails (bad input) leaves the running sequence as it was ...
    await _expect(
        Code.INVALID_ARGUMENT, stub.ModelInfer(_request("gru", x[None, :, :2], 77, start=True))
    )
    # ... a restart that succeeds starts from the initial state
    first = _out(await stub.ModelInfer(_request("gru", x[None, :3], 77, start=True)))
    # a failed request carrying sequence_end changes nothing and does not end the sequence
    await _expect(
        Code.INVALID_ARGUMENT, stub.ModelInfer(_request("gru", x[None, 3:, :1], 77, end=True))
    )
    rest = _out(await stub.ModelInfer(_request("gru", x[None, 3:], 77, end=True)))
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), whole, atol=TOL)
    # batch > 1 in a sequence is refused
    await _expect(
        Code.INVALID_ARGUMENT,
        stub.ModelInfer(_request("gru", x[None].repeat(2, 0), 78, start=True)),
        "batch dim",
    )


async def test_bidirectional_sequence_returns_revised_prefix(stub):
    x = _signal(9, seed=6)
    outs = await _sequence(stub, "bigru", x, 3, [4, 5])
    assert [
        (r.parameters["start"].int64_param, r.parameters["revised"].bool_param) for r in outs
    ] == [(0, True), (0, True)]
    for r, n in zip(outs, (4, 9), strict=True):
        offline = _out(await stub.ModelInfer(_request("bigru", x[None, :n])))
        np.testing.assert_allclose(_out(r), offline, atol=TOL)


async def test_seq2seq_is_rnnzoo_v1_only(stub):
    req = _request("rev", np.zeros((1, 3), np.int64), name="tokens")
    await _expect(Code.FAILED_PRECONDITION, stub.ModelInfer(req), "generate")


async def test_sequences_expire_with_the_session_ttl(zoo):
    server = await _server(zoo[0], session_ttl_s=0.2, sweep_interval_s=0.05)
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = kgrpc.GRPCInferenceServiceStub(ch)
            x = _signal(2, seed=7)[None]
            await stub.ModelInfer(_request("gru", x, 1, start=True))
            await asyncio.sleep(0.5)
            await _expect(Code.NOT_FOUND, stub.ModelInfer(_request("gru", x, 1)), "expired")
    finally:
        await server.stop(0.5)


# ---- streaming --------------------------------------------------------------------------------
async def test_stream_interleaved_sequences_errors_in_band_and_ownership(stub):
    xa, xb = _signal(6, seed=10), _signal(6, seed=11)
    whole_a = _out(await stub.ModelInfer(_request("lstm2", xa[None])))
    whole_b = _out(await stub.ModelInfer(_request("lstm2", xb[None])))
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (item := await queue.get()) is not None:
            yield item

    call = stub.ModelStreamInfer(requests())
    plan = []
    for t in range(6):
        for seq, x in (("a", xa), ("b", xb)):
            plan.append(_request("lstm2", x[None, t : t + 1], seq, t == 0, t == 5, rid=f"{seq}{t}"))
    got: dict[str, list] = {"a": [], "b": []}
    for i, req in enumerate(plan):
        await queue.put(req)
        resp = await call.read()
        assert not resp.error_message, resp.error_message
        got[resp.infer_response.id[0]].append(_out(resp.infer_response))
        if i == 1:
            # held by this open stream: a unary call on it is refused, nothing changes
            await _expect(
                Code.FAILED_PRECONDITION,
                stub.ModelInfer(_request("lstm2", xa[None, 1:2], "a")),
                "open stream",
            )
            await _expect(
                Code.FAILED_PRECONDITION,
                stub.ModelInfer(_request("lstm2", xa[None, :1], "a", start=True)),
                "ModelStreamInfer",
            )
            # a bad request gets its error in band, "CODE: message"; the stream goes on
            await queue.put(_request("lstm2", xa[None, :1, :2], "a", rid="bad"))
            err = await call.read()
            assert err.error_message.startswith("INVALID_ARGUMENT: "), err.error_message
            assert "'bad'" in err.error_message
            await queue.put(_request("lstm2", xa[None, :1], "zz", rid="unknown"))
            err = await call.read()
            assert err.error_message.startswith("NOT_FOUND: ")
    await queue.put(None)
    assert await call.read() == grpc.aio.EOF
    np.testing.assert_allclose(np.concatenate(got["a"], axis=1), whole_a, atol=TOL)
    np.testing.assert_allclose(np.concatenate(got["b"], axis=1), whole_b, atol=TOL)


async def test_undecodable_bytes_are_invalid_argument(server):
    async with grpc.aio.insecure_channel(server.target) as ch:
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        await _expect(Code.INVALID_ARGUMENT, infer(b"\xff\xff\xff"), "inference.ModelInferRequest")
        stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        call = stream(iter([b"\xff\xff\xff", b"\x0a\x01"]))
        first = kpb.ModelStreamInferResponse.FromString(await call.read())
        assert first.error_message.startswith("INVALID_ARGUMENT: ")
        second = kpb.ModelStreamInferResponse.FromString(await call.read())
        assert second.error_message.startswith("INVALID_ARGUMENT: ")  # the stream went on


async def test_statistics_and_both_protocols_share_the_runtime(server, stub):
    x = _signal(3, seed=12)[None]
    before = (await stub.ModelStatistics(kpb.ModelStatisticsRequest(name="rnn"))).model_stats[0]
    await stub.ModelInfer(_request("rnn", x))
    await _expect(Code.INVALID_ARGUMENT, stub.ModelInfer(_request("rnn", x[:, :, :1])))
    after = (await stub.ModelStatistics(kpb.ModelStatisticsRequest(name="rnn"))).model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    assert after.inference_count >= 1 and after.last_inference > 0
    every = await stub.ModelStatistics(kpb.ModelStatisticsRequest())
    assert {m.name for m in every.model_stats} >= {"rnn", "gru", "lstm2"}
    # rnnzoo.v1 on the same port answers from the same runtime
    async with grpc.aio.insecure_channel(server.target) as ch:
        rz = pb_grpc.RnnzooStub(ch)
        r = await rz.Infer(pb.InferRequest(model="rnn", inputs={"x": to_tensor(x)}))
        np.testing.assert_array_equal(
            np.frombuffer(r.outputs["y"].data, np.float32),
            _out(await stub.ModelInfer(_request("rnn", x))).ravel(),
        )


async def test_sequences_are_per_principal(zoo, tmp_path):
    """With authentication, (principal, model, id) names a sequence: another principal's
    id 1 is a different sequence, and bob cannot continue alice's."""
    alice, bob = "a" * 24, "b" * 24
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{alice}\nbob:{bob}\n")
    tokens.chmod(0o600)
    server = RnnzooServer(ServerConfig(port=0, grace_s=0.5, auth_tokens=str(tokens)))
    await server.start()
    await server.load(Runtime.from_dir(zoo[0], RuntimeOptions(session_ttl_s=None)))
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = kgrpc.GRPCInferenceServiceStub(ch)
            md = {n: (("authorization", f"Bearer {t}"),) for n, t in (("a", alice), ("b", bob))}
            x = _signal(4, seed=13)
            await stub.ModelInfer(_request("gru", x[None, :2], 1, start=True), metadata=md["a"])
            await _expect(
                Code.NOT_FOUND, stub.ModelInfer(_request("gru", x[None, 2:], 1), metadata=md["b"])
            )
            await stub.ModelInfer(_request("gru", x[None, :1], 1, start=True), metadata=md["b"])
            rest = await stub.ModelInfer(_request("gru", x[None, 2:], 1), metadata=md["a"])
            whole = await stub.ModelInfer(_request("gru", x[None]), metadata=md["a"])
            np.testing.assert_allclose(_out(rest), _out(whole)[:, 2:], atol=TOL)
            await _expect(Code.UNAUTHENTICATED, stub.ModelInfer(_request("gru", x[None])))
    finally:
        await server.stop(0.5)
