"""A model that fails to load does not take the server down (unless strict): it is listed
not ready with its reason, never half-served, and the reason has no server paths."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from onnx_fixtures import build_rnn, build_seq2seq

from rnnzoo.errors import FailedPrecondition, InvalidArgument
from rnnzoo.proto.inference.v2 import grpc_service_pb2 as kpb
from rnnzoo.proto.inference.v2 import grpc_service_pb2_grpc as kgrpc
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.proto.v1 import rnnzoo_pb2_grpc as pb_grpc
from rnnzoo.server.runtime import ModelRepository, Runtime, RuntimeOptions
from rnnzoo.server.transport import RnnzooServer, ServerConfig


@pytest.fixture
def mixed(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    build_rnn(d / "good.onnx", cell="gru", seed=1)
    (d / "junk.onnx").write_bytes(b"not an onnx file")
    build_seq2seq(d, "pair")
    (d / "pair.decoder.onnx").write_bytes(b"broken half")  # the pair must not be half-served
    return d


def test_strict_load_fails_and_lenient_load_lists_the_failures(mixed):
    with pytest.raises((InvalidArgument, FailedPrecondition)):
        ModelRepository.from_dir(mixed, strict=True)
    repo = ModelRepository.from_dir(mixed, strict=False)
    assert sorted(repo.entries) == ["good"]
    assert sorted(repo.failed) == ["junk", "pair"]
    for why in repo.failed.values():
        assert str(mixed) not in why and "/tmp" not in why, why
    assert "junk.onnx" in repo.failed["junk"]


def test_nothing_servable_still_fails(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"x")
    with pytest.raises((InvalidArgument, FailedPrecondition)):
        ModelRepository.from_dir(tmp_path, strict=False)


async def test_failed_models_are_not_ready_with_their_reason(mixed):
    server = RnnzooServer(ServerConfig(port=0, grace_s=0.2))
    await server.start()
    repo = ModelRepository.from_dir(mixed, strict=False)
    await server.load(Runtime(repo, RuntimeOptions(session_ttl_s=None)))
    try:
        async with grpc.aio.insecure_channel(server.target) as ch:
            ks, rz = kgrpc.GRPCInferenceServiceStub(ch), pb_grpc.RnnzooStub(ch)
            assert (await ks.ServerReady(kpb.ServerReadyRequest())).ready
            assert (await ks.ModelReady(kpb.ModelReadyRequest(name="good"))).ready
            assert not (await ks.ModelReady(kpb.ModelReadyRequest(name="junk"))).ready
            for call in (
                ks.ModelConfig(kpb.ModelConfigRequest(name="pair")),
                ks.ModelMetadata(kpb.ModelMetadataRequest(name="junk")),
                rz.GetModel(pb.GetModelRequest(name="junk")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "failed to load" in info.value.details()
                assert str(mixed) not in info.value.details()
            names = [m.name for m in (await rz.ListModels(pb.ListModelsRequest())).models]
            assert names == ["good"]
            req = kpb.ModelInferRequest(model_name="good")
            x = np.zeros((1, 2, 3), np.float32)
            req.inputs.add(name="x", datatype="FP32", shape=[1, 2, 3])
            req.raw_input_contents.append(x.tobytes())
            assert (await ks.ModelInfer(req)).outputs
    finally:
        await server.stop(0.2)


def test_serve_cli_has_strict(capsys):
    from rnnzoo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    assert "--strict" in capsys.readouterr().out
