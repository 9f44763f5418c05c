"""Contract /2: context windows kept by the server, per-output step rules, chunk rules, the
docs' worked examples served over a real server on loopback, old-format files unchanged."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from contract_examples import build_kws, build_vad, doc_example
from onnx_fixtures import build_rnn

from rnnzoo.client import Client, RpcError
from rnnzoo.contract import Contract, ContractError, read_contract, sidecar_path
from rnnzoo.server.runtime import Runtime, RuntimeOptions
from rnnzoo.server.transport import BackgroundServer

TOL = 1e-5
K, N = 64, 512  # the VAD example's context and chunk


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctx")
    build_vad(d / "vad.onnx", doc_example("vad-example"))
    build_kws(d / "kws-gru.onnx", doc_example("kws-example"))
    build_rnn(d / "gru.onnx", cell="gru", seed=2)  # an old-format (/1) model beside them
    return d


@pytest.fixture(scope="module")
def client(models):
    factory = lambda: Runtime.from_dir(models, RuntimeOptions(session_ttl_s=None))  # noqa: E731
    with BackgroundServer(factory) as srv, Client(srv.target, timeout=20) as c:
        c.wait_ready()
        yield c


def bare_vad(models, audio: np.ndarray) -> dict[str, np.ndarray]:
    """The graph run directly on the zero-padded whole signal: the whole-sequence truth."""
    sess = ort.InferenceSession(str(models / "vad.onnx"), providers=["CPUExecutionProvider"])
    x = np.concatenate([np.zeros(K, np.float32), audio])[None]
    prob, _, level, _ = sess.run(None, {"audio": x, "state": np.zeros((1, 1, 32), np.float32)})
    return {"prob": prob[0], "level": level[0, K:]}


def audio(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32)


def test_streamed_with_server_context_equals_whole_sequence(client, models):
    x = audio(4 * N)
    truth = bare_vad(models, x)
    with client.session("vad") as s:
        outs = [s.step(x[i : i + N]) for i in range(0, len(x), N)]
    assert [o.steps_total for o in outs] == [N, 2 * N, 3 * N, 4 * N]  # new steps: samples
    assert [o.start for o in outs] == [0, N, 2 * N, 3 * N]
    assert all(o["level"].shape == (N,) and o["prob"].shape == (N // K,) for o in outs)
    np.testing.assert_allclose(np.concatenate([o["prob"] for o in outs]), truth["prob"], atol=TOL)
    np.testing.assert_allclose(np.concatenate([o["level"] for o in outs]), truth["level"], atol=TOL)
    for i, o in enumerate(outs):  # once per chunk (time_axis: null)
        frames = truth["prob"][i * N // K : (i + 1) * N // K]
        np.testing.assert_allclose(o["chunk_prob"], [frames.max()], atol=TOL)
    # stateless Infer: the initial context prepended, fixed chunks run in turn, state carried
    whole = client.infer("vad", x[None])
    np.testing.assert_allclose(whole["prob"][0], truth["prob"], atol=TOL)
    np.testing.assert_allclose(whole["level"][0], truth["level"], atol=TOL)


def test_infer_advance_and_reset_carry_the_context(client, models):
    x = audio(3 * N, seed=1)
    truth = bare_vad(models, x)
    with client.session("vad") as s:
        first = s.step(x[:N])
        s.detach()  # a stream owns its session: end it before Infer(advance)
        rest = client.infer("vad", x[None, N:], session_id=s.id, advance=True)
        np.testing.assert_allclose(rest["prob"][0], truth["prob"][N // K :], atol=TOL)
        np.testing.assert_allclose(rest["level"][0], truth["level"][N:], atol=TOL)
    np.testing.assert_allclose(first["prob"], truth["prob"][: N // K], atol=TOL)


def test_wrong_chunk_lengths_are_refused_with_the_rule(client):
    x = audio(N + 12)
    with client.session("vad") as s:
        with pytest.raises(RpcError) as err:
            s.step(x[:500])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exactly 512 new steps (contract chunk.steps=512)" in err.value.details()
        assert "this chunk has 500 steps" in err.value.details()
        ok = s.step(x[:N])  # nothing changed: the session goes on from the start
        assert ok.start == 0 and ok.steps_total == N
    with pytest.raises(RpcError) as err:
        client.infer("vad", audio(1000)[None])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this sequence has 1000 steps" in err.value.details()


def test_multiple_of_rule_and_ort_errors_whole(tmp_path):
    data = doc_example("vad-example")
    data["chunk"] = {"multiple_of": K}
    build_vad(tmp_path / "vad.onnx", data)
    rt_graph = Runtime.from_dir(tmp_path).repo.get("vad").graphs["model"]
    with pytest.raises(Exception, match=r"multiple of 64 new steps.*this chunk has 100 steps"):
        rt_graph.validate_chunk({"audio": audio(100)})
    assert rt_graph.validate_chunk({"audio": audio(3 * K)}).length == 3 * K
    # an input the graph refuses: ORT's text whole, and which input was wrong
    with pytest.raises(Exception) as err:
        bad = {**rt_graph.initial_batch_state(1), "state": np.zeros((1, 1, 7), np.float32)}
        rt_graph.run({"audio": audio(K)[None]}, bad)
    msg = str(err.value)
    assert "input 'state' dim 2 is 7, the graph wants 32" in msg
    assert "audio float32[1, 128] (64 context steps + new)" in msg
    assert "Got: 7 Expected: 32 Please fix either the inputs" in msg  # ORT's text, not cut


async def test_context_is_batched_with_the_states(models):
    rt = Runtime.from_dir(models, RuntimeOptions(session_ttl_s=None, max_delay_ms=20))
    await rt.start()
    try:
        xs = [audio(3 * N, seed=10 + i) for i in range(3)]
        sids = [(await rt.create_session("vad")).id for _ in xs]
        batcher = rt.batchers[("vad", "model")]
        got: list[list] = [[] for _ in xs]
        for a in range(0, 3 * N, N):
            res = await asyncio.gather(
                *(rt.step(sid, {"audio": x[a : a + N]}) for sid, x in zip(sids, xs, strict=True))
            )
            for i, r in enumerate(res):
                got[i].append(r.outputs["prob"])
        assert max(batcher.batch_sizes) > 1  # sessions' contexts were stacked in one call
        for x, g in zip(xs, got, strict=True):
            np.testing.assert_allclose(np.concatenate(g), bare_vad(models, x)["prob"], atol=TOL)
        sess = rt.sessions.get(sids[0])
        assert sess.state["context:audio"].shape == (1, K)  # kept in the session's state
        np.testing.assert_array_equal(sess.state["context:audio"][0], xs[0][-K:])
        await rt.reset_session(sids[0])  # the context window is state: back to zeros
        assert not sess.state["context:audio"].any()
        again = await rt.step(sids[0], {"audio": xs[0][:N]})
        np.testing.assert_allclose(again.outputs["prob"], got[0][0], atol=TOL)
    finally:
        await rt.stop()


def test_kws_example_batch_major_state(client):
    x = np.random.default_rng(4).normal(size=(9, 40)).astype(np.float32)
    whole = client.infer("kws-gru", x[None])["scores"][0]
    with client.session("kws-gru") as s:
        parts = [s.step(x[a : a + 3]) for a in range(0, 9, 3)]
    np.testing.assert_allclose(np.concatenate([p.value for p in parts]), whole, atol=TOL)
    assert whole.shape == (9, 12) and client.model("kws-gru").labels[2] == "yes"


def test_initial_context_is_used(tmp_path):
    data = doc_example("vad-example")
    data["inputs"][0]["initial_context"] = [0.5] * K
    build_vad(tmp_path / "vad.onnx", data)
    graph = Runtime.from_dir(tmp_path).repo.get("vad").graphs["model"]
    np.testing.assert_array_equal(graph.init_states["context:audio"], np.full((1, K), 0.5))
    outs, _ = graph.run({"audio": np.zeros((1, N), np.float32)}, graph.initial_batch_state(1))
    sess = ort.InferenceSession(str(tmp_path / "vad.onnx"), providers=["CPUExecutionProvider"])
    x = np.concatenate([np.full(K, 0.5, np.float32), np.zeros(N, np.float32)])[None]
    want = sess.run(["prob"], {"audio": x, "state": np.zeros((1, 1, 32), np.float32)})[0]
    np.testing.assert_allclose(outs["prob"], want, atol=TOL)
    data["inputs"][0]["initial_context"] = [0.5] * 3
    sidecar_path(tmp_path / "vad.onnx").write_text(json.dumps(data))
    with pytest.raises(Exception, match=r"initial_context has shape \[3\], expected \[64\]"):
        Runtime.from_dir(tmp_path)


# ---- the format ---------------------------------------------------------------------------
def test_old_format_files_load_unchanged(models):
    c = read_contract(models / "gru.onnx")  # written by the /1 fixtures, in metadata
    assert c.format == "rnnzoo.contract/1"
    data = json.loads(c.to_json())
    assert data["format"] == "rnnzoo.contract/1"
    assert not {"context_steps", "drop_leading_steps", "initial_context"} & set(data["inputs"][0])
    assert "chunk" not in data and Contract.from_dict(data) == c


def test_new_fields_need_format_2_and_old_readers_refuse_them(tmp_path):
    data = doc_example("vad-example")
    assert Contract.from_dict(data).to_dict()["format"] == "rnnzoo.contract/2"
    data["format"] = "rnnzoo.contract/1"
    with pytest.raises(ContractError, match=r"uses \['chunk', 'inputs\[0\].context_steps'"):
        Contract.from_dict(data)
    data["format"] = "rnnzoo.contract/2"
    data["outputs"][0]["context_steps"] = 3  # an input-only field on an output
    with pytest.raises(ContractError, match=r"outputs\[0\].context_steps: 0 was expected"):
        Contract.from_dict(data)
    # the reader from before /2 (the parent of the commit that added it) refuses a /2 file
    old = subprocess.run(
        ["git", "show", "5334a88^:src/rnnzoo/contract.py"], capture_output=True, text=True
    )
    if old.returncode:
        pytest.skip("no git history here")
    (tmp_path / "old_contract.py").write_text(old.stdout)
    (tmp_path / "vad.json").write_text(json.dumps(doc_example("vad-example")))
    code = (
        "import sys, pathlib; sys.path.insert(0, sys.argv[1]); import old_contract; "
        "old_contract.Contract.from_json(pathlib.Path(sys.argv[1], 'vad.json').read_text())"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode != 0
    assert "unsupported contract format 'rnnzoo.contract/2'" in run.stderr


def test_context_declared_in_onnx_metadata_as_rnnzoo_export_writes_it(tmp_path):
    """rnnzoo's own exports carry the contract in the metadata (src/rnnzoo/export/graph.py writes
    ``Contract.to_json()``): a /2 contract there is served the same way."""
    import onnx

    from rnnzoo.contract import CONTRACT_KEY

    path = build_vad(tmp_path / "vad.onnx", doc_example("vad-example"), sidecar=False)
    model = onnx.load(str(path))
    text = Contract.from_dict(doc_example("vad-example")).to_json()
    assert json.loads(text)["format"] == "rnnzoo.contract/2"
    onnx.helper.set_model_props(model, {CONTRACT_KEY: text})
    onnx.save(model, str(path))
    graph = Runtime.from_dir(tmp_path).repo.get("vad").graphs["model"]
    x = audio(2 * N, seed=5)
    state = graph.initial_batch_state(1)
    probs = []
    for a in (0, N):
        outs, state = graph.run({"audio": x[None, a : a + N]}, state)
        probs.append(outs["prob"][0])
    np.testing.assert_allclose(np.concatenate(probs), bare_vad(tmp_path, x)["prob"], atol=TOL)


async def test_context_travels_with_snapshots_and_forks(models):
    rt = Runtime.from_dir(models, RuntimeOptions(session_ttl_s=None))
    await rt.start()
    try:
        x = audio(2 * N, seed=7)
        truth = bare_vad(models, x)
        sid = (await rt.create_session("vad")).id
        await rt.step(sid, {"audio": x[:N]})
        _, state, initial, _ = await rt.snapshot_session(sid)
        np.testing.assert_array_equal(state["context:audio"], x[N - K : N])  # batch-free
        assert not initial["context:audio"].any()
        fork = await rt.fork_session(sid)
        res = await rt.step(fork.id, {"audio": x[N:]})
        np.testing.assert_allclose(res.outputs["prob"], truth["prob"][N // K :], atol=TOL)
    finally:
        await rt.stop()
