"""rnnzoo.client.Client against a real server running in a background thread."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from onnx_fixtures import CHARS, build_zoo

from rnnzoo.client import Client, RpcError
from rnnzoo.server.runtime import Runtime, RuntimeOptions
from rnnzoo.server.transport import BackgroundServer

TOL = 1e-5


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    build_zoo(d)
    factory = lambda: Runtime.from_dir(d, RuntimeOptions(session_ttl_s=None))  # noqa: E731
    with BackgroundServer(factory) as srv, Client(srv.target, timeout=20) as c:
        c.wait_ready()
        yield c


def _x(steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, 3)).astype(np.float32)


def test_models(client):
    assert [m.name for m in client.models()] == [
        "bigru",
        "charlm",
        "gru",
        "kws",
        "lstm2",
        "rev",
        "rnn",
    ]
    assert client.model("charlm").task == "lm"
    with pytest.raises(RpcError) as info:
        client.model("nope")
    assert isinstance(info.value, grpc.RpcError)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "lstm2" in info.value.details()


def test_session_steps_equal_infer(client):
    x = _x(9, 1)
    offline = client.infer("lstm2", x[None])["y"][0]
    with client.session("lstm2") as s:
        one = [s.step(x[t]) for t in range(4)]  # single steps without a time axis
        chunk = s.step(x[4:9])  # a chunk
    assert [o.start for o in one] + [chunk.start] == [0, 1, 2, 3, 4]
    assert chunk.steps_total == 9 and [o.request_id for o in one] == [0, 1, 2, 3]
    got = np.concatenate([o["y"] for o in one] + [chunk.value])
    np.testing.assert_allclose(got, offline, atol=TOL)
    with pytest.raises(RpcError) as info:  # the context manager closed it
        client.reset_session(s.id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_helper_pipelines_chunks_in_order(client):
    x = _x(40, 2)
    offline = client.infer("gru", x[None])["y"][0]
    with client.session("gru") as s:
        outs = list(s.stream(x[t : t + 3] for t in range(0, 40, 3)))
        assert [o.start for o in outs] == list(range(0, 40, 3))
        np.testing.assert_allclose(np.concatenate([o.value for o in outs]), offline, atol=TOL)
        s.reset()
        np.testing.assert_allclose(s.step(x).value, offline, atol=TOL)


def test_error_then_resume_and_detach(client):
    x = _x(6, 3)
    offline = client.infer("rnn", x[None])["y"][0]
    s = client.session("rnn")
    first = s.step(x[:2]).value
    with pytest.raises(RpcError) as info:
        s.step(np.zeros((1, 5), np.float32))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.request_id == 1 and "dim 1 must be 3" in info.value.details()
    second = s.step(x[2:4]).value  # a new Stream call; the session did not move
    s.detach()
    other = client.resume(s.id, "rnn")  # e.g. another process holding the id
    third = other.step(x[4:]).value
    with pytest.raises(RpcError) as info:  # while ``other`` holds the session
        s.step(x[:1])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    other.close()
    np.testing.assert_allclose(np.concatenate([first, second, third]), offline, atol=TOL)


def test_text_infer_and_generate(client):
    logits = client.infer("charlm", "abc")["logits"]
    ids = np.array([[CHARS.index(c) for c in "abc"]])
    np.testing.assert_array_equal(logits, client.infer("charlm", {"tokens": ids})["logits"])
    with client.session("charlm") as s:
        np.testing.assert_allclose(s.step("abc").value, logits[0], atol=TOL)
    a = list(client.generate("charlm", "ab", max_tokens=15, seed=3))
    assert a == list(client.generate("charlm", "ab", max_tokens=15, seed=3))
    assert 1 <= len(a) <= 15 and all(p in CHARS for p in a)
    with pytest.raises(RpcError) as info:
        list(client.generate("charlm", "ab", max_tokens=0))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_multi_input_model_needs_a_dict(client):
    from rnnzoo.errors import InvalidArgument

    with client.session("kws") as s:  # one input: a bare array is fine
        assert s.step(np.ones((2, 4), np.float32))["scores"].shape == (2, 5)
    with pytest.raises(InvalidArgument, match="supported dtypes"):
        client.infer("gru", np.array([["a"]]))
