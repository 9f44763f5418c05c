"""Streaming and batching: chunked == whole, batched == unbatched, bidirectional revised
outputs == offline prefix inference, failing batch isolation, bad inputs change nothing."""

import asyncio
import threading
import time

import numpy as np
import pytest
from onnx_fixtures import CHARS, build_zoo, reference, reference_external

from rnnzoo.errors import InvalidArgument, ResourceExhausted
from rnnzoo.server.runtime import ModelRepository, Runtime, RuntimeOptions
from rnnzoo.server.runtime.batching import Batcher
from rnnzoo.server.runtime.model import Chunk


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    refs = build_zoo(d)
    return ModelRepository.from_dir(d), refs


async def started(repo, **opts) -> Runtime:
    rt = Runtime(repo, RuntimeOptions(**opts))
    await rt.start()
    return rt


def seq(t: int, f: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(t, f)).astype(np.float32)


@pytest.mark.parametrize("name", ["lstm2", "gru", "rnn"])
async def test_chunked_streaming_equals_whole_sequence_and_reference(zoo, name):
    repo, refs = zoo
    rt = await started(repo)
    try:
        xs = seq(11, seed=1)
        s = await rt.create_session(name)
        outs = []
        for a, b in [(0, 1), (1, 4), (4, 5), (5, 11)]:
            r = await rt.step(s.id, {"x": xs[a:b]})
            assert r.start == a and r.steps_total == b and not r.revised
            outs.append(r.outputs["y"])
        got = np.concatenate(outs)
        whole = await rt.infer(name, {"x": xs[None]})
        np.testing.assert_allclose(got, whole["y"][0], atol=1e-6)
        want, _ = reference(refs[name], xs[None])
        np.testing.assert_allclose(got, want[0], atol=1e-5)
    finally:
        await rt.stop()


async def test_sidecar_model_streams_with_batch_major_state(zoo):
    repo, refs = zoo
    rt = await started(repo, max_delay_ms=2.0)
    try:
        xs = [seq(7, 4, seed=i) for i in range(3)]
        sids = [(await rt.create_session("kws")).id for _ in xs]
        outs: list[list[np.ndarray]] = [[] for _ in xs]
        for a, b in [(0, 2), (2, 3), (3, 7)]:
            res = await asyncio.gather(
                *(rt.step(sid, {"features": x[a:b]}) for sid, x in zip(sids, xs, strict=True))
            )
            for i, r in enumerate(res):
                outs[i].append(r.outputs["scores"])
        want, _ = reference_external(refs["kws"], np.stack(xs))
        for i in range(3):
            np.testing.assert_allclose(np.concatenate(outs[i]), want[i], atol=1e-5)
        assert max(rt.batchers[("kws", "model")].batch_sizes) > 1
    finally:
        await rt.stop()


async def test_bidirectional_steps_return_exact_revised_prefix(zoo):
    repo, refs = zoo
    rt = await started(repo)
    try:
        xs = seq(9, seed=4)
        s = await rt.create_session("bigru")
        for a, b in [(0, 2), (2, 3), (3, 9)]:
            r = await rt.step(s.id, {"x": xs[a:b]})
            assert r.revised and r.start == 0 and r.steps_total == b
            offline = await rt.infer("bigru", {"x": xs[None, :b]})
            np.testing.assert_allclose(r.outputs["y"], offline["y"][0], atol=1e-6)
            want, _ = reference(refs["bigru"], xs[None, :b])
            np.testing.assert_allclose(r.outputs["y"], want[0], atol=1e-5)
    finally:
        await rt.stop()


async def test_bidirectional_buffer_limit(zoo):
    repo, _ = zoo
    rt = await started(repo, max_buffer_steps=5)
    try:
        s = await rt.create_session("bigru")
        await rt.step(s.id, {"x": seq(4)})
        with pytest.raises(ResourceExhausted, match="max_buffer_steps=5"):
            await rt.step(s.id, {"x": seq(2)})
        r = await rt.step(s.id, {"x": seq(1)})  # the refused chunk left nothing behind
        assert r.steps_total == 5
        await rt.reset_session(s.id)
        assert (await rt.step(s.id, {"x": seq(5)})).steps_total == 5
    finally:
        await rt.stop()


async def run_interleaved(repo, model: str, plans, **opts):
    """Each session steps its own chunks; sessions run concurrently."""
    rt = await started(repo, **opts)
    try:
        sids = [(await rt.create_session(model)).id for _ in plans]

        async def drive(sid, chunks):
            return [await rt.step(sid, c) for c in chunks]

        res = await asyncio.gather(*(drive(s, p) for s, p in zip(sids, plans, strict=True)))
        calls = sum(b.calls for b in rt.batchers.values())
        sizes = [n for b in rt.batchers.values() for n in b.batch_sizes]
        return res, calls, sizes
    finally:
        await rt.stop()


@pytest.mark.parametrize("model", ["lstm2", "charlm", "bigru"])
async def test_batching_equals_no_batching_with_different_chunk_lengths(zoo, model):
    repo, _ = zoo
    rng = np.random.default_rng(5)
    plans = []
    for i in range(6):
        lengths = rng.integers(1, 5, size=4 + i % 3)
        if model == "charlm":
            plans.append([{"tokens": rng.integers(0, len(CHARS), n)} for n in lengths])
        else:
            plans.append([{"x": seq(int(n), seed=int(rng.integers(1 << 30)))} for n in lengths])
    alone, calls_alone, _ = await run_interleaved(repo, model, plans, max_batch=1)
    batched, calls_b, sizes = await run_interleaved(
        repo, model, plans, max_batch=64, max_delay_ms=5
    )
    assert max(sizes) > 1 and calls_b < calls_alone  # batching really happened
    key = "tokens" if model == "charlm" else "x"
    out = "logits" if model == "charlm" else "y"
    for plan, ra, rb in zip(plans, alone, batched, strict=True):
        for chunk, a, b in zip(plan, ra, rb, strict=True):
            assert (a.start, a.steps_total) == (b.start, b.steps_total)
            assert a.outputs[out].shape[0] == (b.steps_total if a.revised else len(chunk[key]))
            np.testing.assert_allclose(a.outputs[out], b.outputs[out], atol=1e-6)


async def test_pipelined_executor_batches_equal_no_batching_and_never_share_a_session(
    zoo, monkeypatch
):
    """Every batch goes to the executor (no inline budget), up to PIPELINE_DEPTH at once:
    results still equal unbatched ones, and no session is ever in two running batches."""
    from rnnzoo.server.runtime import batching

    monkeypatch.setattr(batching, "INLINE_MAX_STEPS", 0)
    monkeypatch.setattr(batching, "INLINE_BUDGET_S", 0.0)
    in_flight: set = set()
    overlaps: list = []
    peak = [0]
    lock = threading.Lock()
    run_jobs = batching.Batcher._run_jobs

    def watched(self, jobs):
        keys = {j.key for j in jobs}
        with lock:
            overlaps.extend(keys & in_flight)
            in_flight.update(keys)
            peak[0] = max(peak[0], len(in_flight))
        try:
            time.sleep(0.002)  # long enough for the loop to start the next batch meanwhile
            return run_jobs(self, jobs)
        finally:
            with lock:
                in_flight.difference_update(keys)

    monkeypatch.setattr(batching.Batcher, "_run_jobs", watched)
    rng = np.random.default_rng(11)
    plans = [
        [{"x": seq(int(n), seed=int(rng.integers(1 << 30)))} for n in rng.integers(1, 4, 6)]
        for _ in range(8)
    ]
    alone, _, _ = await run_interleaved(repo := zoo[0], "lstm2", plans, max_batch=1)
    piped, _, sizes = await run_interleaved(repo, "lstm2", plans, max_batch=3, max_delay_ms=1)
    assert not overlaps
    assert max(sizes) > 1 and peak[0] > max(sizes)  # batches did run side by side
    for ra, rb in zip(alone, piped, strict=True):
        for a, b in zip(ra, rb, strict=True):
            assert (a.start, a.steps_total) == (b.start, b.steps_total)
            np.testing.assert_allclose(a.outputs["y"], b.outputs["y"], atol=1e-6)


async def test_batch_starts_once_every_attached_stream_has_queued_not_after_the_delay(zoo):
    """With a 60 s delay, a batch must still start as soon as every attached stream has a
    chunk queued, and a stream that detaches must stop being waited for. A broken wake-up
    would sit out the delay and hit the 10 s timeouts below (no timing is asserted)."""
    repo, _ = zoo
    rt = await started(repo, max_delay_ms=60_000)
    try:
        sids = [(await rt.create_session("gru")).id for _ in range(4)]
        tokens = [await rt.attach(sid) for sid in sids]
        batcher = rt.batchers[("gru", "model")]
        res = await asyncio.wait_for(
            asyncio.gather(
                *(rt.step(sid, {"x": seq(2, seed=i)}, tokens[i]) for i, sid in enumerate(sids))
            ),
            timeout=10,
        )
        assert [r.steps_total for r in res] == [2] * 4 and list(batcher.batch_sizes) == [4]
        # three streams send, the fourth detaches instead: the batch of three goes at once
        pending = [
            asyncio.create_task(rt.step(sid, {"x": seq(1)}, tokens[i]))
            for i, sid in enumerate(sids[:3])
        ]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in pending)  # still waiting for the fourth stream
        rt.detach(sids[3], tokens[3])
        await asyncio.wait_for(asyncio.gather(*pending), timeout=10)
        assert list(batcher.batch_sizes)[-1] == 3
    finally:
        await rt.stop()


async def test_an_idle_attached_stream_does_not_hold_back_the_others(zoo):
    """A stream that is attached but sends nothing stops being waited for once it has been
    idle for the active window: with a 60 s delay, the active stream's chunks must not sit
    out the delay (the 10 s timeouts would fire; no timing is asserted)."""
    repo, _ = zoo
    rt = await started(repo, max_delay_ms=60_000)
    try:
        batcher = rt.batchers[("gru", "model")]
        batcher._active_window_s = 0.05  # the window derived from a 60 s delay is 20 min
        sids = [(await rt.create_session("gru")).id for _ in range(3)]
        tokens = [await rt.attach(sid) for sid in sids]
        await asyncio.sleep(0.1)  # all idle now; the other two stay attached and silent
        for n in range(3):
            res = await asyncio.wait_for(rt.step(sids[0], {"x": seq(1, seed=n)}, tokens[0]), 10)
            assert res.steps_total == n + 1
        await asyncio.sleep(0.1)  # now the first one is idle too: an idle one wakes up alone
        res = await asyncio.wait_for(rt.step(sids[1], {"x": seq(1)}, tokens[1]), 10)
        assert res.steps_total == 1
    finally:
        await rt.stop()


async def test_batches_over_the_time_budget_leave_the_event_loop(zoo, monkeypatch):
    """Inline or executor is decided by the predicted ORT time (measured seconds per step x
    steps), so a slow model cannot stall the loop however few steps it runs."""
    from rnnzoo.server.runtime import batching

    threads: list[int] = []
    run_jobs = batching.Batcher._run_jobs
    monkeypatch.setattr(
        batching.Batcher,
        "_run_jobs",
        lambda self, jobs: threads.append(threading.get_ident()) or run_jobs(self, jobs),
    )
    repo, _ = zoo
    rt = await started(repo, max_delay_ms=0)
    try:
        sids = [(await rt.create_session("gru")).id for _ in range(2)]
        b = rt.batchers[("gru", "model")]
        await asyncio.gather(*(rt.step(sid, {"x": seq(3)}) for sid in sids))
        assert b._s_per_step[2] > 0  # measured on the real call (batch of 2: bucket 2)
        assert threads == [threading.get_ident()]  # cheap: ran on the loop
        b._s_per_step = {k: 1.0 for k in range(1, 8)}  # as if each step took a second
        assert not b._inline(1, 1) and b._inline(0, 1)
        r = await asyncio.gather(*(rt.step(sid, {"x": seq(3)}) for sid in sids))
        assert [x.steps_total for x in r] == [6, 6]
        assert threads[-1] != threading.get_ident()  # went to the executor
    finally:
        await rt.stop()


async def test_finite_check_passes_huge_finite_values_and_catches_inf(zoo):
    """The finite check sums first: a sum that overflows (finite values near float32 max)
    must still pass, an infinity must not."""
    repo, _ = zoo
    rt = await started(repo)
    try:
        s = await rt.create_session("gru")
        huge = np.full((2, 3), 3e38, np.float32)  # sum overflows to inf, every value finite
        assert (await rt.step(s.id, {"x": huge})).steps_total == 2
        with pytest.raises(InvalidArgument, match="NaN or infinity"):
            await rt.step(s.id, {"x": np.array([[1, np.inf, 0]], np.float32)})
    finally:
        await rt.stop()


async def test_batcher_takes_one_chunk_per_session_and_respects_max_batch(zoo):
    repo, _ = zoo
    rt = await started(repo, max_batch=2, max_delay_ms=5)
    try:
        a, b, c = [(await rt.create_session("gru")).id for _ in range(3)]
        await asyncio.gather(*(rt.step(s, {"x": seq(2)}) for s in (a, b, c)))
        sizes = rt.batchers[("gru", "model")].batch_sizes
        assert max(sizes) <= 2 and sum(sizes) == 3
    finally:
        await rt.stop()


async def test_failing_batch_member_does_not_hurt_the_others(zoo):
    """A chunk that makes ORT fail (token id out of range, slipped past validation) is
    isolated: the other members get their exact results, the bad one an InvalidArgument."""
    repo, refs = zoo
    graph = repo.get("charlm").graphs["model"]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(graph, pool, max_batch=8, max_delay_ms=5)
        batcher.start()
        good = [np.array([1, 2, 3]), np.array([4, 5, 0])]
        bad = np.array([1, 99, 2])  # Gather out of bounds inside ORT
        jobs = [
            batcher.submit(i, Chunk({"tokens": t}, 3), graph.init_states)
            for i, t in enumerate([good[0], bad, good[1]])
        ]
        res = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.stop(1.0)
    assert list(batcher.batch_sizes) == [1, 1]  # the batch of 3 failed; members retried alone
    assert isinstance(res[1], InvalidArgument) and "state is unchanged" in str(res[1])
    for i, tokens in ((0, good[0]), (2, good[1])):
        want, want_st = reference(refs["charlm"], tokens[None])
        np.testing.assert_allclose(res[i][0]["logits"], want[0], atol=1e-5)
        np.testing.assert_allclose(res[i][1]["h0"], want_st["hn"], atol=1e-5)


def _bad_inputs():
    x = seq(3)
    return [
        ({"x": x[None]}, r"expected rank 2 shape \['time', 3\], got shape \[1, 3, 3\]"),
        ({"x": seq(3, f=4)}, r"dim 1 must be 3"),
        ({"x": x.astype(np.int64)}, r"expected dtype float32, got int64"),
        ({"x": np.where(x > 0, np.nan, x)}, r"NaN or infinity"),
        ({"x": np.zeros((0, 3), np.float32)}, r"empty chunk"),
        ({"z": x}, r"missing \['x'\], unknown \['z'\]"),
        ({}, r"missing \['x'\]"),
    ]


@pytest.mark.parametrize("bad,msg", _bad_inputs())
async def test_bad_inputs_are_rejected_and_leave_state_unchanged(zoo, bad, msg):
    repo, _ = zoo
    rt = await started(repo)
    try:
        s = await rt.create_session("lstm2")
        ref = await rt.create_session("lstm2")
        await rt.step(s.id, {"x": seq(2, seed=9)})
        await rt.step(ref.id, {"x": seq(2, seed=9)})
        with pytest.raises(InvalidArgument, match=msg):
            await rt.step(s.id, bad)
        a = await rt.step(s.id, {"x": seq(3, seed=10)})
        b = await rt.step(ref.id, {"x": seq(3, seed=10)})
        assert a.steps_total == 5
        np.testing.assert_array_equal(a.outputs["y"], b.outputs["y"])
    finally:
        await rt.stop()


async def test_token_and_cast_rules(zoo):
    repo, _ = zoo
    rt = await started(repo)
    try:
        s = await rt.create_session("charlm")
        with pytest.raises(
            InvalidArgument, match=r"token ids must be in \[0, 9\), got values in \[0, 9\]"
        ):
            await rt.step(s.id, {"tokens": np.array([0, 9])})
        with pytest.raises(InvalidArgument, match="expected dtype int64, got float32"):
            await rt.step(s.id, {"tokens": np.array([1.0], np.float32)})
        r = await rt.step(s.id, {"tokens": np.array([1, 2], np.int32)})  # int32 widens safely
        assert r.steps_total == 2
        g = await rt.create_session("gru")
        r64 = await rt.step(g.id, {"x": seq(2).astype(np.float64)})  # float64 -> float32
        assert r64.outputs["y"].dtype == np.float32
    finally:
        await rt.stop()


async def test_infer_batched_stateless_and_from_session(zoo):
    repo, refs = zoo
    rt = await started(repo)
    try:
        xb = np.stack([seq(5, seed=i) for i in range(3)])
        out = await rt.infer("lstm2", {"x": xb})
        want, _ = reference(refs["lstm2"], xb)
        np.testing.assert_allclose(out["y"], want, atol=1e-5)
        s = await rt.create_session("lstm2")
        await rt.step(s.id, {"x": xb[0, :2]})
        peek = await rt.infer("lstm2", {"x": xb[:1, 2:]}, session_id=s.id)
        np.testing.assert_allclose(peek["y"][0], want[0, 2:], atol=1e-5)
        r = await rt.step(s.id, {"x": xb[0, 2:3]})  # peek did not advance
        assert r.start == 2
        await rt.infer("lstm2", {"x": xb[:1, 3:]}, session_id=s.id, advance=True)
        assert (await rt.step(s.id, {"x": xb[0, :1]})).start == 5
        with pytest.raises(InvalidArgument, match="batch size 1, got 3"):
            await rt.infer("lstm2", {"x": xb}, session_id=s.id)
        with pytest.raises(InvalidArgument, match="belongs to model 'lstm2'"):
            await rt.infer("gru", {"x": xb[:1]}, session_id=s.id)
    finally:
        await rt.stop()


async def test_a_lone_unary_chunk_does_not_wait_out_the_window_but_concurrent_ones_batch(zoo):
    """No stream attached: a chunk alone goes at once (the window here is a minute: waiting
    it out would fail the 10 s bound), while chunks that queue together still share a call."""
    repo, refs = zoo
    graph = repo.get("gru").graphs["model"]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(graph, pool, max_batch=2, max_delay_ms=60_000)
        batcher.start()
        x = seq(3)
        outs, _ = await asyncio.wait_for(
            batcher.submit("a", Chunk({"x": x}, 3), graph.init_states), 10
        )
        np.testing.assert_allclose(outs["y"], reference(refs["gru"], x[None])[0][0], atol=1e-5)
        assert list(batcher.batch_sizes) == [1]
        both = [batcher.submit(k, Chunk({"x": x}, 3), graph.init_states) for k in "bc"]
        await asyncio.wait_for(asyncio.gather(*both), 10)  # max_batch 2 fills: no wait
        assert list(batcher.batch_sizes) == [1, 2]
        await batcher.stop(1.0)
