"""rnnzoo.v1 StepMany: one message steps many sessions. Real servers on loopback (in a thread,
and ``rnnzoo serve`` with a state store), outputs checked against ONNX Runtime run directly."""

from __future__ import annotations

import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx_fixtures import CHARS
from scaleout_harness import Serve

from rnnzoo.client import Client, RpcError
from rnnzoo.client_many import StepManyError
from rnnzoo.proto.tensors import to_tensors
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.server.runtime import Runtime, RuntimeOptions
from rnnzoo.server.transport import BackgroundServer, ServerConfig

EXACT = 1e-6


@pytest.fixture(scope="module")
def server(zoo):
    factory = lambda: Runtime.from_dir(zoo, RuntimeOptions(session_ttl_s=None))  # noqa: E731
    with BackgroundServer(factory) as srv:
        yield srv


@pytest.fixture
def client(server):
    with Client(server.target, timeout=20) as c:
        c.wait_ready()
        yield c


def _x(steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, 3)).astype(np.float32)


def ort_whole(path, x: np.ndarray) -> np.ndarray:
    """The graph run by ONNX Runtime on the whole sequence (batch 1) from zero states: the
    first output."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name in ("x", "tokens"):
            feeds[i.name] = x[None]
        else:
            shape = [1 if isinstance(d, str) else d for d in i.shape]
            feeds[i.name] = np.zeros(shape, np.float32)
    return sess.run(None, feeds)[0][0]


def test_many_sessions_of_several_models_step_exactly_as_ort_runs_the_whole_sequences(
    client, server, zoo
):
    xs = {("lstm2", 0): _x(6, 0), ("lstm2", 1): _x(6, 1), ("gru", 2): _x(6, 2)}
    xs[("bigru", 3)] = _x(6, 3)
    text = "ab cadefgh"
    tokens = np.array([CHARS.index(ch) for ch in text], np.int64)
    sids = {key: client.create_session(key[0]).session_id for key in xs}
    lm = client.create_session("charlm").session_id
    got: dict = {key: [] for key in xs}
    lm_out, last = [], {}
    lstm = server.server.runtime.batchers[("lstm2", "model")]
    calls_before = len(lstm.batch_sizes)
    for t0, t1 in ((0, 1), (1, 3), (3, 4), (4, 6)):  # chunks of 1 and 2 steps
        chunks = {sids[key]: x[t0:t1] for key, x in xs.items()}
        chunks[lm] = text[t0:t1]
        outs = client.step_many(chunks)
        assert list(outs) == list(chunks)  # by session, in the chunks' order
        for key in xs:
            o = outs[sids[key]]
            assert o.steps_total == t1
            got[key].append(o["y"])
            last[key] = o
        assert outs[lm].start == t0
        lm_out.append(outs[lm]["logits"])
    for key, x in xs.items():
        truth = ort_whole(zoo / f"{key[0]}.onnx", x)
        if key[0] == "bigru":  # non-streamable: the last result revises the whole prefix
            assert last[key].revised and last[key].start == 0
            np.testing.assert_allclose(last[key]["y"], truth, atol=EXACT)
        else:
            np.testing.assert_allclose(np.concatenate(got[key]), truth, atol=EXACT)
    np.testing.assert_allclose(
        np.concatenate(lm_out), ort_whole(zoo / "charlm.onnx", tokens[:6]), atol=EXACT
    )
    # the two lstm2 chunks of each message ran as one ORT call
    assert 2 in list(lstm.batch_sizes)[calls_before:]


def test_the_same_sessions_stepped_again_in_any_order_stay_exact(client, server, zoo):
    # the same sessions in the same order: the batcher feeds the last batch's whole next
    # states again (slabs.py); another order or a subset gathers the rows as usual
    xs = [_x(9, 40 + i) for i in range(6)]
    sids = [client.create_session("lstm2").session_id for _ in xs]
    lstm = server.server.runtime.batchers[("lstm2", "model")]
    reused = lstm.slabs.reused
    got: list[list[np.ndarray]] = [[] for _ in xs]
    orders = [[0, 1, 2, 3, 4, 5]] * 4 + [[0, 2, 1, 3, 4, 5], [5, 3, 1, 0, 2, 4], [2, 4]]
    orders += [[0, 1, 2, 3, 4, 5]] * 2
    for order in orders:  # one step per message; a session left out waits a message
        outs = client.step_many({sids[k]: xs[k][len(got[k]) : len(got[k]) + 1] for k in order})
        for k in order:
            got[k].append(outs[sids[k]].outputs["y"])
    assert lstm.slabs.reused > reused  # the kept batches were fed again
    for k, x in enumerate(xs):
        n = len(got[k])
        np.testing.assert_allclose(
            np.concatenate(got[k]), ort_whole(zoo / "lstm2.onnx", x[:n]), atol=EXACT
        )


def test_a_failing_chunk_gets_its_own_error_and_neither_the_others_nor_the_stream_fail(client):
    a = client.create_session("gru").session_id
    b = client.create_session("gru").session_id
    c = client.create_session("gru").session_id
    x = _x(3, 5)
    stub, calls = client.stub, []

    def message(*chunks):
        calls.append(pb.StepManyRequest(chunks=list(chunks)))

    def chunk(sid, arr, rid, **kw):
        return pb.StreamRequest(session_id=sid, request_id=rid, inputs=to_tensors({"x": arr}), **kw)

    message(chunk(a, x[:1], 0), chunk(b, x[:1], 0), chunk(c, x[:1], 0))
    message(
        chunk(a, x[1:2], 1),
        chunk("no-such-session", x[1:2], 2),
        chunk(b, np.zeros((1, 7), np.float32), 3),  # 7 features, the model takes 3
        chunk(a, x[2:3], 4),  # a second chunk of session a
        chunk(c, x[1:2], 5, position=9),  # c is at 1: a gap
    )
    message(chunk(b, x[1:2], 6), chunk(a, x[2:3], 7), chunk(c, x[1:2], 8, position=1))
    replies = list(stub.StepMany(iter(calls)))
    assert len(replies) == 3
    r = replies[1].results
    assert [res.request_id for res in r] == [1, 2, 3, 4, 5]
    assert not r[0].HasField("error") and r[0].steps_total == 2
    codes = [res.error.code if res.HasField("error") else None for res in r]
    want = [
        None,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    ]
    assert codes == [w and w.value[0] for w in want]
    assert "more than one chunk" in r[3].error.message
    assert "position 1" in r[4].error.message and "3" in r[2].error.message
    # failed chunks changed nothing, and the same call goes on: b and c move on from 1
    r2 = replies[2].results
    assert [res.steps_total for res in r2] == [2, 3, 2]
    assert not any(res.HasField("error") for res in r2)
    # the client raises one error that carries the applied outputs and each failure
    with pytest.raises(StepManyError) as info:
        client.step_many({a: x[:1], "no-such-session": x[:1]}, model="gru")
    err = info.value
    assert isinstance(err, RpcError) and err.code() == grpc.StatusCode.NOT_FOUND
    assert list(err.outputs) == [a] and err.outputs[a].steps_total == 4
    assert err.errors["no-such-session"].code() == grpc.StatusCode.NOT_FOUND


def test_results_that_would_take_the_response_over_the_message_limit_fail_in_their_place(zoo):
    # charlm: one character in, 9 floats out per step, so results outgrow their requests
    cfg = ServerConfig(port=0, max_message_mb=0.01)  # 10 485 bytes
    factory = lambda: Runtime.from_dir(zoo, RuntimeOptions(session_ttl_s=None))  # noqa: E731
    text = "abcdefgh " * 11 + "a"  # 100 steps: ~3.7 KB of outputs per result
    with BackgroundServer(factory, cfg) as srv, Client(srv.target, timeout=20) as c:
        a, b, d = (c.create_session("charlm").session_id for _ in range(3))
        with pytest.raises(StepManyError) as info:
            c.step_many({a: text, b: text, d: text})
        err = info.value
        assert list(err.outputs) == [a, b]  # in the chunks' order: the third is over
        assert err.errors[d].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "message limit" in err.errors[d].details()
        assert [err.outputs[s].steps_total for s in (a, b)] == [100, 100]
        # the refused chunk changed nothing: its session is still at 0, the others at 100
        again = c.step_many({d: text[:10], a: text[:10]})
        assert again[d].start == 0 and again[d].steps_total == 10
        assert again[a].start == 100


def test_a_resent_message_gets_the_stored_results_and_applies_nothing_twice(client, zoo):
    x = _x(4, 7)
    sids = [client.create_session("lstm2").session_id for _ in range(3)]
    first = client.step_many({s: x[:2] for s in sids}, positions=dict.fromkeys(sids, 0))
    # the same message again (a retry after a lost answer): the stored results, not re-applied
    again = client.step_many({s: x[:2] for s in sids}, positions=dict.fromkeys(sids, 0))
    for s in sids:
        assert again[s].steps_total == first[s].steps_total == 2
        np.testing.assert_array_equal(again[s]["y"], first[s]["y"])
    rest = client.step_many({s: x[2:] for s in sids})  # positions learned from the results
    truth = ort_whole(zoo / "lstm2.onnx", x)
    for s in sids:
        assert rest[s].start == 2
        np.testing.assert_allclose(np.concatenate([first[s]["y"], rest[s]["y"]]), truth, atol=EXACT)


def test_a_message_mixing_a_replayed_chunk_and_new_ones_answers_each_in_its_place(client, zoo):
    x = _x(4, 8)
    a, b, c = (client.create_session("gru").session_id for _ in range(3))
    first = client.step_many({a: x[:2]}, positions={a: 0})
    # a: a retry (its kept result); b, c: new chunks computed beside it
    mixed = client.step_many({b: x[:2], a: x[:2], c: x[:2]}, positions=dict.fromkeys((a, b, c), 0))
    assert list(mixed) == [b, a, c]
    np.testing.assert_array_equal(mixed[a]["y"], first[a]["y"])
    assert mixed[a].steps_total == mixed[b].steps_total == mixed[c].steps_total == 2
    rest = client.step_many({a: x[2:], b: x[2:], c: x[2:]})
    truth = ort_whole(zoo / "gru.onnx", x)
    for s in (a, b, c):
        assert rest[s].start == 2
        np.testing.assert_allclose(np.concatenate([mixed[s]["y"], rest[s]["y"]]), truth, atol=EXACT)


def test_a_session_attached_to_a_stream_is_refused_in_its_own_place(client):
    x = _x(2, 9)
    held = client.session("gru")
    held.step(x[:1])  # its Stream call stays open: the session is attached there
    free = client.create_session("gru").session_id
    with pytest.raises(StepManyError) as info:
        client.step_many({free: x[:1], held.id: x[1:]})
    assert info.value.errors[held.id].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.outputs[free].steps_total == 1
    held.close()


def test_step_many_writes_through_the_state_store_and_a_restart_loses_nothing(
    zoo, state_store, tmp_path
):
    xs = {m: _x(5, i) for i, m in enumerate(["lstm2", "gru", "rnn"])}
    srv = Serve(zoo, state_store, tmp_path, "--lease-ttl", "2")
    try:
        with Client(srv.target, timeout=20) as c:
            c.wait_ready(20)
            sids = {m: c.create_session(m).session_id for m in xs}
            firsts = c.step_many({sids[m]: x[:3] for m, x in xs.items()})
        srv.kill9()  # acknowledged steps are in the store before their answers went out
        srv.stop()
        srv = Serve(zoo, state_store, tmp_path, "--lease-ttl", "2")
        with Client(srv.target, timeout=20) as c:
            c.wait_ready(20)
            for m in xs:
                c.resume(sids[m], m)  # tells the client each session's model
            chunks = {sids[m]: x[3:] for m, x in xs.items()}
            rest: dict = {}
            deadline = time.monotonic() + 15
            while chunks:  # the killed server's leases run out after --lease-ttl
                try:
                    rest.update(c.step_many(chunks, positions=dict.fromkeys(chunks, 3)))
                    break
                except StepManyError as err:
                    lease = all("lease runs out" in e.details() for e in err.errors.values())
                    if not lease or time.monotonic() > deadline:
                        raise
                    rest.update(err.outputs)
                    chunks = {s: chunks[s] for s in err.errors}
                    time.sleep(0.2)
        for m, x in xs.items():
            got = np.concatenate([firsts[sids[m]]["y"], rest[sids[m]]["y"]])
            assert rest[sids[m]].start == 3
            np.testing.assert_allclose(got, ort_whole(zoo / f"{m}.onnx", x), atol=EXACT)
    finally:
        srv.stop()


def test_context_window_sessions_step_many_exactly_as_the_whole_signal(tmp_path):
    """A model whose context window the server keeps (contract /2): StepMany carries it per
    session like Stream does."""
    from contract_examples import build_vad, doc_example

    build_vad(tmp_path / "vad.onnx", doc_example("vad-example"))
    k, n = 64, 512  # the example's context and chunk
    factory = lambda: Runtime.from_dir(tmp_path, RuntimeOptions(session_ttl_s=None))  # noqa: E731
    signals = [np.random.default_rng(s).uniform(-1, 1, 3 * n).astype(np.float32) for s in (1, 2)]
    with BackgroundServer(factory) as srv, Client(srv.target, timeout=20) as c:
        sids = [c.create_session("vad").session_id for _ in signals]
        got: list[list] = [[], []]
        for i in range(0, 3 * n, n):
            outs = c.step_many({sid: x[i : i + n] for sid, x in zip(sids, signals, strict=True)})
            for j, sid in enumerate(sids):
                got[j].append(outs[sid]["prob"])
    bare = ort.InferenceSession(str(tmp_path / "vad.onnx"), providers=["CPUExecutionProvider"])
    for x, g in zip(signals, got, strict=True):
        padded = np.concatenate([np.zeros(k, np.float32), x])[None]
        prob = bare.run(None, {"audio": padded, "state": np.zeros((1, 1, 32), np.float32)})[0]
        np.testing.assert_allclose(np.concatenate(g), prob[0], atol=1e-5)
