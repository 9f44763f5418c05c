"""The protocol: generated code is fresh, tensors travel as exact raw bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rnnzoo.errors import InvalidArgument
from rnnzoo.proto import generate
from rnnzoo.proto.tensors import DTYPES, from_tensor, to_tensor
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb


def test_generated_code_is_not_stale(tmp_path):
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools (the dev extra)")
    fresh = generate.generate(tmp_path)
    assert [p.name for p in fresh] == list(generate.OUTPUTS)
    for p in fresh:
        checked_in = Path(generate.HERE) / "v1" / p.name
        assert p.read_bytes() == checked_in.read_bytes(), (
            f"{checked_in} is stale: run `python -m rnnzoo.proto.generate` and commit the result"
        )
    grpc_code = (tmp_path / "rnnzoo_pb2_grpc.py").read_text()
    assert "from . import rnnzoo_pb2" in grpc_code and "from rnnzoo.v1" not in grpc_code


def test_package_is_versioned():
    assert pb.DESCRIPTOR.package == "rnnzoo.v1"
    service = pb.DESCRIPTOR.services_by_name["Rnnzoo"]
    assert {m.name for m in service.methods} == {
        "ListModels",
        "GetModel",
        "CreateSession",
        "CloseSession",
        "ResetSession",
        "Stream",
        "Infer",
        "Generate",
        "SnapshotSession",
        "ForkSession",
        "StepMany",
    }
    stream = service.methods_by_name["Stream"]
    assert stream.client_streaming and stream.server_streaming


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_tensor_roundtrip_is_exact(dtype):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(2, 3, 4)) * 100).astype(dtype)
    t = to_tensor(a)
    assert t.dtype == dtype and list(t.shape) == [2, 3, 4]
    assert len(t.data) == a.size * np.dtype(dtype).itemsize
    b = from_tensor(pb.Tensor.FromString(t.SerializeToString()))
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(b, a)


def test_tensor_bytes_are_little_endian_c_order():
    a = np.arange(6, dtype=">f4").reshape(2, 3).T  # big-endian, not C-contiguous
    t = to_tensor(a)
    assert t.data == np.ascontiguousarray(a, dtype="<f4").tobytes()
    np.testing.assert_array_equal(from_tensor(t), a)
    assert from_tensor(to_tensor(np.float32(2.5))).shape == ()  # scalars have shape []


@pytest.mark.parametrize(
    "tensor, needle",
    [
        (pb.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 15), "needs 16"),
        (pb.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8), "unknown dtype"),
        (pb.Tensor(dtype="", shape=[1], data=b"\0" * 4), "unknown dtype"),
        (pb.Tensor(dtype="int64", shape=[-2, -3], data=b"\0" * 48), "dims must be >= 0"),
        (pb.Tensor(dtype="int32", shape=[1] * 17, data=b"\0" * 4), "rank"),
        (pb.Tensor(dtype="bool", shape=[2], data=b"\x00\x07"), "0 or 1"),
    ],
)
def test_bad_tensors_are_invalid_argument(tensor, needle):
    with pytest.raises(InvalidArgument, match=needle):
        from_tensor(tensor, name="input 'x'")


def test_unsupported_arrays_are_refused_before_sending():
    with pytest.raises(InvalidArgument, match="supported dtypes"):
        to_tensor(np.array(["a", "b"]))


def test_inference_code_is_not_stale(tmp_path):
    """Triton's protos (package ``inference``) generate the checked-in modules, imports
    made relative so they load as ``rnnzoo.proto.inference.v2``."""
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools (the dev extra)")
    fresh = generate.generate_inference(tmp_path)
    assert {p.name for p in fresh} == {
        "model_config_pb2.py",
        "model_config_pb2.pyi",
        "grpc_service_pb2.py",
        "grpc_service_pb2.pyi",
        "grpc_service_pb2_grpc.py",
    }
    here = Path(generate.HERE) / "inference" / "v2"
    for p in fresh:
        assert p.read_bytes() == (here / p.name).read_bytes(), (
            f"{here / p.name} is stale: run `python -m rnnzoo.proto.generate` and commit it"
        )
    for p in fresh:
        text = p.read_text()
        assert "\nimport model_config_pb2" not in text and "\nimport grpc_service_pb2" not in text


def test_inference_protos_are_triton_verbatim_with_their_licence():
    from rnnzoo.proto.inference.v2 import grpc_service_pb2 as kpb

    assert kpb.DESCRIPTOR.package == "inference"
    service = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
    } <= {m.name for m in service.methods}
    here = Path(generate.HERE) / "inference" / "v2"
    for name in ("grpc_service.proto", "model_config.proto"):
        head = (here / name).read_text()[:2000]
        assert "NVIDIA CORPORATION" in head and "Redistribution and use" in head
    assert (
        "BSD" in (here / "UPSTREAM").read_text()
        or "Redistribution" in (here / "UPSTREAM").read_text()
    )
