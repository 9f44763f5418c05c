"""Model versions while serving: a new version takes new sessions, live sessions keep theirs to
their end (both protocols), retired versions drain, explicit load/unload, broken versions are
listed with their reason while the version before serves, and a pinned session survives a
restart with a state store. Real servers on loopback; the poll is driven by its own call
(``control.poll()``), the same one the poll loop makes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from onnx_fixtures import build_rnn, reference
from test_server_cli import _wait_listening

from rnnzoo.client import Client, RpcError
from rnnzoo.errors import FailedPrecondition
from rnnzoo.proto.inference.v2 import grpc_service_pb2 as kpb
from rnnzoo.proto.inference.v2 import grpc_service_pb2_grpc as kgrpc
from rnnzoo.server.runtime import ModelRepository, Runtime, RuntimeOptions
from rnnzoo.server.runtime.repository import ControlOptions
from rnnzoo.server.transport import ServerConfig
from rnnzoo.server.transport.server import BackgroundServer

TOL = 2e-5
Code = grpc.StatusCode


def _version(root, v: int, seed: int) -> dict:
    """Version ``v`` of model "m" (a GRU; the seed sets its weights) in Triton's layout."""
    folder = root / "m" / str(v)
    folder.mkdir(parents=True, exist_ok=True)
    return build_rnn(folder / "m.onnx", cell="gru", seed=seed, name="m")


def _x(t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(t, 3)).astype(np.float32)


def _ref(params: dict, x: np.ndarray) -> np.ndarray:
    return reference(params, x[None].astype(np.float64))[0][0]


def _server(root, store: str | None = None, **control) -> BackgroundServer:
    opts = ControlOptions(**{"mode": "poll", **control})

    def runtime() -> Runtime:
        repo = ModelRepository.from_dir(root, strict=False, control=opts)
        return Runtime(repo, RuntimeOptions(session_ttl_s=None, state_store=store))

    return BackgroundServer(runtime, ServerConfig(port=0, grace_s=0.2))


def _poll(bg: BackgroundServer) -> list[str]:
    return bg._call(bg.server.control.poll())


def _drain(bg: BackgroundServer) -> None:
    bg._call(bg.server.control.drain_once())


def _index(stub) -> dict[str, tuple[str, str]]:
    resp = stub.RepositoryIndex(kpb.RepositoryIndexRequest())
    return {m.version: (m.state, m.reason) for m in resp.models if m.name == "m"}


def _kreq(x: np.ndarray, seq: int, start: bool = False, end: bool = False, version: str = ""):
    req = kpb.ModelInferRequest(model_name="m", model_version=version)
    req.inputs.add(name="x", datatype="FP32", shape=[1, *x.shape])
    req.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    if seq:
        req.parameters["sequence_id"].int64_param = seq
        req.parameters["sequence_start"].bool_param = start
        req.parameters["sequence_end"].bool_param = end
    return req


def _kout(resp) -> np.ndarray:
    shape = list(resp.outputs[0].shape)
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(shape)[0]


def test_a_new_version_takes_new_sessions_while_live_ones_finish_exactly_on_theirs(tmp_path):
    p1 = _version(tmp_path, 1, seed=1)
    x = _x(8, seed=3)
    with _server(tmp_path) as bg, Client(bg.target) as client:
        ks = kgrpc.GRPCInferenceServiceStub(client.channel)
        old = client.session("m")
        assert client.model("m").version == 1
        got = [old.step(x[t : t + 1]).value for t in range(3)]  # one open Stream call
        first = ks.ModelInfer(_kreq(x[:3], seq=11, start=True))
        assert first.model_version == "1"
        p2 = _version(tmp_path, 2, seed=2)
        changes = _poll(bg)
        assert any("version 2 loaded" in c for c in changes)
        assert any("version 1 retired" in c for c in changes), changes
        # the name's batcher (generation, attachments) follows the newest version's graph
        rt = bg.runtime
        assert rt.batchers[("m", "model")].model is rt.repo.get("m@2").graphs["model"]
        assert rt.batchers[("m@1", "model")].model is rt.repo.get("m@1").graphs["model"]
        # the live session and the live sequence run on version 1 to their end
        got += [old.step(x[t : t + 1]).value for t in range(3, 8)]
        np.testing.assert_allclose(np.concatenate(got), _ref(p1, x), atol=TOL)
        last = ks.ModelInfer(_kreq(x[3:], seq=11, end=True))
        assert last.model_version == "1"  # the version its session runs on
        np.testing.assert_allclose(
            np.concatenate([_kout(first), _kout(last)]), _ref(p1, x), atol=TOL
        )
        # new sessions, new sequences and unversioned requests get version 2
        info = client.create_session("m")
        assert info.version == 2
        new = client.resume(info.session_id, "m", 0)
        np.testing.assert_allclose(new.step(x).value, _ref(p2, x), atol=TOL)
        fresh = ks.ModelInfer(_kreq(x, seq=12, start=True, end=True))
        assert fresh.model_version == "2"
        np.testing.assert_allclose(_kout(fresh), _ref(p2, x), atol=TOL)
        stateless = ks.ModelInfer(_kreq(x, seq=0))
        assert stateless.model_version == "2"
        np.testing.assert_allclose(_kout(stateless), _ref(p2, x), atol=TOL)
        # the retired version refuses new work, saying which version serves
        with pytest.raises(grpc.RpcError) as err:
            ks.ModelInfer(_kreq(x, seq=0, version="1"))
        assert err.value.code() == Code.FAILED_PRECONDITION
        assert "version 1" in err.value.details() and "version 2" in err.value.details()
        models = {m.name: m for m in client.models()}
        assert [(v.version, v.state) for v in models["m"].versions] == [
            (1, "DRAINING"),
            (2, "READY"),
        ]
        assert _index(ks)["1"][0] == "UNLOADING"
        # drained once its last session closes
        old.close()
        _drain(bg)
        assert _index(ks)["1"][0] == "UNAVAILABLE" and "drained" in _index(ks)["1"][1]
        new.close()


def test_a_retired_versions_sessions_are_cut_off_after_the_drain_timeout(tmp_path):
    _version(tmp_path, 1, seed=1)
    x = _x(4)
    with _server(tmp_path, drain_timeout_s=0.0) as bg, Client(bg.target) as client:
        s = client.session("m")
        s.step(x[:2])
        shutil.rmtree(tmp_path / "m" / "1")
        _version(tmp_path, 2, seed=2)
        _poll(bg)
        _drain(bg)  # timeout 0: dropped with its session still open
        with pytest.raises(RpcError) as err:
            s.step(x[2:])
        assert err.value.code() == Code.FAILED_PRECONDITION
        msg = err.value.details()
        assert "version 1 of model 'm'" in msg and "--drain-timeout 0 s" in msg, msg
        assert client.create_session("m").version == 2


def test_explicit_load_and_unload(tmp_path):
    p1 = _version(tmp_path, 1, seed=1)
    x = _x(5)
    with (
        _server(tmp_path, mode="explicit") as bg,
        grpc.insecure_channel(bg.target) as ch,
    ):
        ks = kgrpc.GRPCInferenceServiceStub(ch)
        assert _index(ks)["1"][0] == "UNAVAILABLE" and "RepositoryModelLoad" in _index(ks)["1"][1]
        assert not ks.ModelReady(kpb.ModelReadyRequest(name="m")).ready
        ks.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="m"))
        assert ks.ModelReady(kpb.ModelReadyRequest(name="m", version="1")).ready
        first = ks.ModelInfer(_kreq(x[:2], seq=5, start=True))
        ks.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="m"))
        assert _index(ks)["1"][0] == "UNLOADING"
        assert not ks.ModelReady(kpb.ModelReadyRequest(name="m")).ready
        with pytest.raises(grpc.RpcError) as err:
            ks.ModelInfer(_kreq(x, seq=0))
        assert err.value.code() == Code.FAILED_PRECONDITION and "unloaded" in err.value.details()
        # the live sequence finishes on its version
        last = ks.ModelInfer(_kreq(x[2:], seq=5, end=True))
        np.testing.assert_allclose(
            np.concatenate([_kout(first), _kout(last)]), _ref(p1, x), atol=TOL
        )
        _drain(bg)
        assert _index(ks)["1"] == ("UNAVAILABLE", "unloaded; drained")
        with pytest.raises(grpc.RpcError) as err:
            ks.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="nope"))
        assert err.value.code() == Code.NOT_FOUND and "'m'" in err.value.details()
        ks.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="m"))
        assert ks.ModelReady(kpb.ModelReadyRequest(name="m")).ready


def _bad_graph(root) -> None:
    (root / "m" / "2").mkdir(parents=True)
    (root / "m" / "2" / "m.onnx").write_bytes(b"not an onnx graph")


def _failed_parity(root) -> None:
    from rnnzoo import parity_record

    _version(root, 2, seed=2)
    f = root / "m" / "2" / "m.onnx"
    rec = parity_record.make_record("m", ok=False, summary="FAIL m max abs 3e-3", files=[f])
    parity_record.write_record(parity_record.record_path(f.parent, "m"), rec)


def _bad_sidecar(root) -> None:
    _version(root, 2, seed=2)
    (root / "m" / "2" / "m.rnnzoo.json").write_text('{"name": "m", "inputs": 7}')


@pytest.mark.parametrize("breakage", [_bad_graph, _failed_parity, _bad_sidecar])
def test_a_broken_new_version_is_listed_with_its_reason_and_the_old_one_serves(tmp_path, breakage):
    p1 = _version(tmp_path, 1, seed=1)
    x = _x(4)
    with _server(tmp_path) as bg, Client(bg.target) as client:
        ks = kgrpc.GRPCInferenceServiceStub(client.channel)
        s = client.session("m")
        a = s.step(x[:2]).value
        breakage(tmp_path)
        _poll(bg)
        state, reason = _index(ks)["2"]
        assert state == "UNAVAILABLE" and reason and str(tmp_path) not in reason, reason
        assert _index(ks)["1"] == ("READY", "")
        b = s.step(x[2:]).value
        np.testing.assert_allclose(np.concatenate([a, b]), _ref(p1, x), atol=TOL)
        assert client.create_session("m").version == 1
        assert not ks.ModelReady(kpb.ModelReadyRequest(name="m", version="2")).ready


def test_a_pinned_session_survives_a_restart_with_the_store_and_a_server_without_its_version_names_it(
    tmp_path,
):
    repo = tmp_path / "repo"
    p1 = _version(repo, 1, seed=1)
    _version(repo, 2, seed=2)
    (repo / "m" / "config.pbtxt").write_text("version_policy: { all: {} }\n")
    store = str(tmp_path / "store")
    x = _x(6)
    with _server(repo, store) as bg, Client(bg.target) as client:
        info = client.create_session("m", version=1)
        assert info.version == 1
        s = client.resume(info.session_id, "m", 0)
        a = s.step(x[:3]).value
        s.detach()
        assert client.snapshot(info.session_id).version == 1  # the snapshot names it too
    with _server(repo, store) as bg, Client(bg.target) as client:
        s = client.resume(info.session_id, "m", 3)
        b = s.step(x[3:]).value
        np.testing.assert_allclose(np.concatenate([a, b]), _ref(p1, x), atol=TOL)
        s.detach()
    shutil.rmtree(repo / "m" / "1")
    with _server(repo, store) as bg, Client(bg.target) as client:
        s = client.resume(info.session_id, "m", 6)
        with pytest.raises(RpcError) as err:
            s.step(x[:1])
        assert "version 1" in err.value.details(), err.value.details()


def test_serve_polls_the_repository_and_checks_its_model_control_flags(tmp_path):
    _version(tmp_path, 1, seed=1)
    cli = [sys.executable, "-m", "rnnzoo.cli", "serve", "--model-dir", str(tmp_path)]
    r = subprocess.run([*cli, "--load-model", "m"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--model-control explicit" in r.stderr, r.stderr
    explicit = [*cli, "--port", "0", "--model-control", "explicit", "--load-model", "nope"]
    r = subprocess.run(explicit, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "'nope'" in r.stderr and "['m']" in r.stderr, r.stderr
    proc = subprocess.Popen(
        [*cli, "--port", "0", "--model-control", "poll", "--repository-poll-secs", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        target = _wait_listening(proc)
        with grpc.insecure_channel(target) as ch:
            ks = kgrpc.GRPCInferenceServiceStub(ch)
            assert not ks.ModelReady(kpb.ModelReadyRequest(name="m", version="2")).ready
            _version(tmp_path, 2, seed=2)
            deadline = time.monotonic() + 30
            while not ks.ModelReady(kpb.ModelReadyRequest(name="m", version="2")).ready:
                assert time.monotonic() < deadline, "the poll never loaded version 2"
                time.sleep(0.1)
            meta = ks.ModelMetadata(kpb.ModelMetadataRequest(name="m"))
            assert list(meta.versions) == ["2"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_version_policy_comes_from_the_models_config_pbtxt(tmp_path):
    for v in (1, 2, 3):
        _version(tmp_path, v, seed=v)
    assert ModelRepository.from_dir(tmp_path).served_versions("m") == [3]  # latest 1
    cfg = tmp_path / "m" / "config.pbtxt"
    cfg.write_text("version_policy: { latest: { num_versions: 2 } }\n")
    repo = ModelRepository.from_dir(tmp_path)
    assert repo.served_versions("m") == [2, 3] and repo.get("m").info.version == 3
    cfg.write_text("version_policy: { specific: { versions: [1, 3] } }\n")
    assert ModelRepository.from_dir(tmp_path).served_versions("m") == [1, 3]
    cfg.write_text("version_policy: { latest: { num_versions: 0 } }\n")
    with pytest.raises(FailedPrecondition, match=r"config.pbtxt.*num_versions >= 1"):
        ModelRepository.from_dir(tmp_path, strict=False)
