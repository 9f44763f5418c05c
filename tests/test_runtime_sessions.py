"""Session store and session lifecycle through the Runtime facade (injectable clock, no sleeps)."""

import asyncio

import numpy as np
import pytest
from onnx_fixtures import build_zoo

from rnnzoo.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from rnnzoo.server.runtime import ModelRepository, Runtime, RuntimeOptions
from rnnzoo.server.runtime.sessions import SessionStore


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    build_zoo(d)
    return ModelRepository.from_dir(d)


def make_runtime(repo, clock=None, **opts) -> Runtime:
    return Runtime(repo, RuntimeOptions(**opts), clock=clock)


async def until_store_holds(rt: Runtime, n: int) -> None:
    """Wait for the background sweeper to leave ``n`` sessions (a bound, not a timing test)."""
    for _ in range(200):
        if len(rt.sessions) == n:
            break
        await asyncio.sleep(0.01)
    assert len(rt.sessions) == n


def x(t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(t, 3)).astype(np.float32)


def test_ids_are_long_random_and_urlsafe():
    store = SessionStore()
    ids = {store.create("m", {}).id for _ in range(200)}
    assert len(ids) == 200
    for sid in ids:
        assert len(sid) >= 32 and set(sid) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


def test_idle_ttl_expiry_says_why():
    clock = Clock()
    store = SessionStore(ttl_s=10, clock=clock)
    a, b = store.create("m", {}), store.create("m", {})
    clock.t += 6
    store.get(b.id)  # touching b keeps it alive
    clock.t += 6
    assert store.sweep() == 1
    with pytest.raises(NotFound, match=r"was expired after 10 s idle at \d{4}-\d\d-\d\dT"):
        store.get(a.id)
    assert store.get(b.id) is b
    clock.t += 11  # lazily expired on access, without a sweep
    with pytest.raises(NotFound, match="expired"):
        store.get(b.id)


def test_a_session_may_ask_for_a_shorter_ttl_never_a_longer_one():
    clock = Clock()
    store = SessionStore(ttl_s=10, clock=clock)
    short, default = store.create("m", {}, ttl_s=2.5), store.create("m", {})
    assert (store.info(short).ttl_s, store.info(default).ttl_s) == (2.5, 10)
    clock.t += 3
    with pytest.raises(NotFound, match=r"expired after 2.5 s idle"):
        store.get(short.id)
    assert store.get(default.id) is default
    for bad, msg in [
        (11, "longer than this server's session TTL of 10 s"),
        (0, "positive"),
        (-1, "positive"),
        (float("nan"), "positive"),
        (float("inf"), "positive"),
    ]:
        with pytest.raises(InvalidArgument, match=msg):
            store.create("m", {}, ttl_s=bad)
    assert len(store) == 1  # short expired; the refused requests created nothing
    unlimited = SessionStore(ttl_s=None, clock=clock)  # no server TTL: any TTL may be asked
    s = unlimited.create("m", {}, ttl_s=1e6)
    forever = unlimited.create("m", {})
    clock.t += 2e6
    assert unlimited.sweep() == 1 and unlimited.get(forever.id) is forever
    with pytest.raises(NotFound, match="expired"):
        unlimited.get(s.id)


async def test_sweeper_runs_without_a_server_ttl_for_sessions_that_asked_for_one(repo):
    clock = Clock()
    rt = make_runtime(repo, clock=clock, session_ttl_s=None, sweep_interval_s=0.01)
    await rt.start()
    try:
        await rt.create_session("gru", ttl_s=5), await rt.create_session("gru")
        clock.t += 6
        await until_store_holds(rt, 1)
    finally:
        await rt.stop()


@pytest.mark.parametrize("ttl", [None, 0])
def test_ttl_can_be_disabled(ttl):
    clock = Clock()
    store = SessionStore(ttl_s=ttl, clock=clock)
    s = store.create("m", {})
    clock.t += 1e9
    assert store.sweep() == 0 and store.get(s.id) is s


def test_capacity_reject_and_evict_lru():
    store = SessionStore(max_sessions=2, on_full="reject")
    store.create("m", {}), store.create("m", {})
    with pytest.raises(ResourceExhausted, match="maximum of 2 sessions"):
        store.create("m", {})
    clock = Clock()
    store = SessionStore(max_sessions=2, on_full="evict", clock=clock)
    a = store.create("m", {})
    b = store.create("m", {})
    store.get(a.id)  # a is now more recently used than b
    c = store.create("m", {})
    with pytest.raises(NotFound, match=r"evicted \(least recently used"):
        store.get(b.id)
    assert store.get(a.id) is a and store.get(c.id) is c


def test_tombstones_are_bounded_then_unknown():
    store = SessionStore(max_tombstones=3)
    ids = [store.create("m", {}).id for _ in range(5)]
    for sid in ids:
        store.close(sid)
    with pytest.raises(NotFound, match="was closed at"):
        store.get(ids[-1])
    with pytest.raises(NotFound, match="no session"):
        store.get(ids[0])
    with pytest.raises(NotFound, match="no session 'made-u…'"):
        store.get("made-up")


def test_attach_conflict_detach_and_resume():
    store = SessionStore()
    s = store.create("m", {})
    tok = store.attach(s.id, "stream-1")
    with pytest.raises(FailedPrecondition, match=s.id[:6]):
        store.attach(s.id, "stream-2")
    other = store.create("m", {})
    store.detach(s.id, store.attach(other.id, "stream-2"))  # a stranger's lease releases nothing
    with pytest.raises(FailedPrecondition):
        store.attach(s.id, "stream-2")
    store.detach(s.id, tok)
    tok2 = store.attach(s.id, "stream-2")
    assert tok2 is not tok and tok2.epoch == tok.epoch + 1


async def test_runtime_session_lifecycle_reset_and_resume(repo):
    rt = make_runtime(repo)
    await rt.start()
    try:
        info = await rt.create_session("gru")
        assert info.model == "gru" and info.ttl_s == 600.0 and info.created_at > 1e9
        tok = await rt.attach(info.id)
        r1 = await rt.step(info.id, {"x": x(4)}, tok)
        rt.detach(info.id, tok)  # disconnect: the session survives
        tok = await rt.attach(info.id)
        r2 = await rt.step(info.id, {"x": x(2, 1)}, tok)
        assert (r2.start, r2.steps_total, r2.revised) == (4, 6, False)
        await rt.reset_session(info.id, tok)  # the holder itself may reset
        r3 = await rt.step(info.id, {"x": x(4)}, tok)
        assert r3.start == 0 and r3.steps_total == 4
        np.testing.assert_array_equal(r3.outputs["y"], r1.outputs["y"])
        with pytest.raises(FailedPrecondition, match="attached to an open stream"):
            await rt.close_session(info.id)  # not its holder: refused
        await rt.close_session(info.id, tok)
        with pytest.raises(NotFound, match="was closed"):
            await rt.step(info.id, {"x": x(1)})
    finally:
        await rt.stop()


async def test_initial_state_is_validated_and_used(repo):
    rt = make_runtime(repo)
    await rt.start()
    try:
        with pytest.raises(InvalidArgument, match=r"expected shape \[1, 8\]"):
            await rt.create_session("gru", {"h0": np.zeros((1, 1, 8))})
        with pytest.raises(InvalidArgument, match=r"unknown; model 'gru' has states \['h0'\]"):
            await rt.create_session("gru", {"c0": np.zeros((1, 8))})
        h = np.full((1, 8), 0.5, np.float32)
        a = await rt.create_session("gru", {"h0": h})
        b = await rt.create_session("gru")
        ra = await rt.step(a.id, {"x": x(3)})
        rb = await rt.step(b.id, {"x": x(3)})
        assert not np.allclose(ra.outputs["y"], rb.outputs["y"])
        want = await rt.infer("gru", {"x": x(3)[None]}, session_id=None)
        np.testing.assert_allclose(rb.outputs["y"], want["y"][0], atol=1e-6)
        await rt.reset_session(a.id)  # back to the given initial state, not zeros
        again = await rt.step(a.id, {"x": x(3)})
        np.testing.assert_array_equal(again.outputs["y"], ra.outputs["y"])
    finally:
        await rt.stop()


async def test_runtime_ttl_with_injected_clock(repo):
    clock = Clock()
    rt = make_runtime(repo, clock=clock, session_ttl_s=30)
    await rt.start()
    try:
        s = await rt.create_session("gru")
        clock.t += 31
        with pytest.raises(NotFound, match="expired after 30 s idle"):
            await rt.step(s.id, {"x": x(1)})
    finally:
        await rt.stop()


async def test_runtime_capacity_options(repo):
    rt = make_runtime(repo, max_sessions=1, on_full="reject")
    await rt.start()
    await rt.create_session("gru")
    with pytest.raises(ResourceExhausted):
        await rt.create_session("gru")
    await rt.stop()
    with pytest.raises(InvalidArgument, match="on_full"):
        make_runtime(repo, on_full="drop")


async def test_steps_of_one_session_apply_in_order(repo):
    rt = make_runtime(repo, max_delay_ms=1.0)
    await rt.start()
    try:
        s = await rt.create_session("lstm2")
        chunks = [x(1 + i % 3, i) for i in range(12)]
        results = await asyncio.gather(*(rt.step(s.id, {"x": c}) for c in chunks))
        assert [r.start for r in results] == list(np.cumsum([0] + [len(c) for c in chunks])[:-1])
        whole = await rt.infer("lstm2", {"x": np.concatenate(chunks)[None]})
        got = np.concatenate([r.outputs["y"] for r in results])
        np.testing.assert_allclose(got, whole["y"][0], atol=1e-6)
    finally:
        await rt.stop()


async def test_lifecycle_ready_and_unavailable_after_stop(repo):
    rt = make_runtime(repo)
    assert not rt.ready
    with pytest.raises(Unavailable):
        await rt.create_session("gru")
    await rt.start()
    assert rt.ready
    s = await rt.create_session("gru")
    await rt.stop(grace_s=1.0)
    assert not rt.ready
    with pytest.raises(Unavailable, match="not serving"):
        rt.list_models()
    for call in (lambda: rt.create_session("gru"), lambda: rt.reset_session(s.id)):
        with pytest.raises(Unavailable, match="not serving"):
            await call()
    with pytest.raises(Unavailable):
        await rt.step(s.id, {"x": x(1)})


async def test_stop_drains_work_in_flight(repo):
    rt = make_runtime(repo, max_delay_ms=20.0)
    await rt.start()
    sessions = [(await rt.create_session("gru")).id for _ in range(4)]
    tasks = [asyncio.create_task(rt.step(sid, {"x": x(5)})) for sid in sessions]
    await asyncio.sleep(0)  # queued, waiting out the batch delay
    await rt.stop(grace_s=5.0)
    results = await asyncio.gather(*tasks)
    assert all(r.steps_total == 5 for r in results)


async def test_sweeper_expires_idle_sessions_in_the_background(repo):
    clock = Clock()
    rt = make_runtime(repo, clock=clock, session_ttl_s=30, sweep_interval_s=0.01)
    await rt.start()
    try:
        await rt.create_session("gru"), await rt.create_session("gru")
        assert len(rt.sessions) == 2
        clock.t += 31
        await until_store_holds(rt, 0)
    finally:
        await rt.stop()


async def test_models_are_listed_with_contracts(repo):
    rt = make_runtime(repo)
    await rt.start()
    try:
        infos = {m.name: m for m in rt.list_models()}
        assert infos["rev"].task == "seq2seq" and not infos["rev"].streamable
        assert set(infos["rev"].contracts) == {"encoder", "decoder"}
        assert infos["kws"].contract.constants[0].name == "sample_rate"
        assert rt.get_model("bigru").streamable is False
        with pytest.raises(NotFound, match="known models"):
            rt.get_model("missing")
        with pytest.raises(FailedPrecondition, match="seq2seq"):
            await rt.create_session("rev")
    finally:
        await rt.stop()


async def test_reset_or_close_during_a_step_drops_its_result(repo):
    rt = make_runtime(repo, max_delay_ms=30.0)
    await rt.start()
    try:
        s = await rt.create_session("gru")
        task = asyncio.create_task(rt.step(s.id, {"x": x(3)}))
        await asyncio.sleep(0)  # queued in the batcher, not yet run
        await rt.reset_session(s.id)
        with pytest.raises(FailedPrecondition, match="reset or closed while this step ran"):
            await task
        r = await rt.step(s.id, {"x": x(2)})
        assert (r.start, r.steps_total) == (0, 2)
        task = asyncio.create_task(rt.step(s.id, {"x": x(3)}))
        await asyncio.sleep(0)
        await rt.close_session(s.id)
        with pytest.raises(FailedPrecondition):
            await task
    finally:
        await rt.stop()
