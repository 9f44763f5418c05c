"""Prometheus metrics, scraped over HTTP on loopback from a real server (--metrics-port)."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rnnzoo.proto.inference.v2 import grpc_service_pb2 as kpb
from rnnzoo.proto.inference.v2 import grpc_service_pb2_grpc as kgrpc
from rnnzoo.proto.tensors import to_tensor
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc
from rnnzoo.server.runtime import Runtime, RuntimeOptions
from rnnzoo.server.transport import RnnzooServer, ServerConfig


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _kreq(model: str, x: np.ndarray, seq=0, start=False, end=False):
    req = kpb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    if seq:
        req.parameters["sequence_id"].int64_param = seq
        req.parameters["sequence_start"].bool_param = start
        req.parameters["sequence_end"].bool_param = end
    return req


async def test_metrics_are_scraped_over_http(zoo):
    server = RnnzooServer(ServerConfig(port=0, grace_s=0.5, metrics_port=0))
    await server.start()
    opts = RuntimeOptions(session_ttl_s=None, max_sessions=2, on_full="evict")
    await server.load(Runtime.from_dir(zoo, opts))
    try:
        assert server.metrics_port
        before = await asyncio.to_thread(_scrape, server.metrics_port)
        x = np.random.default_rng(0).normal(size=(1, 5, 3)).astype(np.float32)
        async with grpc.aio.insecure_channel(server.target) as ch:
            rz, ks = pb_grpc.RnnzooStub(ch), kgrpc.GRPCInferenceServiceStub(ch)
            await rz.Infer(pb.InferRequest(model="gru", inputs={"x": to_tensor(x)}))
            with pytest.raises(grpc.aio.AioRpcError):
                await rz.GetModel(pb.GetModelRequest(name="nope"))
            await ks.ModelInfer(_kreq("gru", x))
            # a stream of 3 messages counts 3 requests; one session created then closed
            sid = (await rz.CreateSession(pb.CreateSessionRequest(model="gru"))).session_id

            async def chunks():
                for t in range(3):
                    yield pb.StreamRequest(
                        session_id=sid, request_id=t, inputs={"x": to_tensor(x[0, t : t + 1])}
                    )

            assert len([r async for r in rz.Stream(chunks())]) == 3
            await rz.CloseSession(pb.CloseSessionRequest(session_id=sid))
            # a kserve stream: 2 good messages and one in-band error
            reqs = [
                _kreq("gru", x[:, :1], 5, start=True),
                _kreq("gru", x[:, 1:2], 5, end=True),
                _kreq("gru", x[:, 1:2], 5),
            ]
            resps = [r async for r in ks.ModelStreamInfer(iter(reqs))]
            assert [bool(r.error_message) for r in resps] == [False, False, True]
            # three sessions at capacity 2: one is evicted
            for _ in range(3):
                await rz.CreateSession(pb.CreateSessionRequest(model="rnn"))
        after = await asyncio.to_thread(_scrape, server.metrics_port)
    finally:
        await server.stop(0.5)

    def delta(name, **labels):
        return _get(after, name, **labels) - _get(before, name, **labels)

    # request series carry the model and, where resolved, its version; a name that is not a
    # served model never becomes a label
    ok = {"code": "OK", "model": "gru"}
    v1 = {**ok, "version": "1"}
    assert delta("rnnzoo_requests_total", rpc="Infer", protocol="rnnzoo.v1", **ok, version="") == 1
    assert (
        delta(
            "rnnzoo_requests_total",
            rpc="GetModel",
            protocol="rnnzoo.v1",
            code="NOT_FOUND",
            model="",
            version="",
        )
        == 1
    )
    assert delta("rnnzoo_requests_total", rpc="ModelInfer", protocol="kserve", **v1) == 1
    assert delta("rnnzoo_requests_total", rpc="Stream", protocol="rnnzoo.v1", **v1) == 3
    assert delta("rnnzoo_streams_total", rpc="Stream", protocol="rnnzoo.v1", code="OK") == 1
    assert delta("rnnzoo_requests_total", rpc="ModelStreamInfer", protocol="kserve", **v1) == 2
    assert (
        delta(
            "rnnzoo_requests_total",
            rpc="ModelStreamInfer",
            protocol="kserve",
            code="NOT_FOUND",
            model="gru",
            version="1",
        )
        == 1
    )
    assert (
        delta("rnnzoo_request_seconds_count", rpc="Infer", protocol="rnnzoo.v1", **ok, version="")
        == 1
    )
    assert not [name for name, _ in after if name.endswith("_created")]
    assert delta("rnnzoo_sessions_total", event="created") == 5
    assert delta("rnnzoo_sessions_total", event="closed") == 2  # CloseSession + sequence_end
    assert delta("rnnzoo_sessions_total", event="evicted") == 1
    assert _get(after, "rnnzoo_sessions_open") >= 2
    assert delta("rnnzoo_batch_size_count", model="gru") >= 5
    assert delta("rnnzoo_queue_delay_seconds_count", model="gru") >= 0
    assert delta("rnnzoo_ort_run_seconds_count", model="gru") >= 7
    assert _get(after, "rnnzoo_model_ready", model="lstm2") == 1


def test_serve_flag_validates_the_port():
    with pytest.raises(Exception, match="metrics port"):
        ServerConfig(metrics_port=70000).check()
