"""Isolation (issue 11): long work runs in the long-job pool, off the event loop, sliced with
its state carried, capped, and shared round-robin across callers. Correctness only: the
latency effect is a benchmark (``python -m rnnzoo.benchmarks.isolation``), not a timed test.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from onnx_fixtures import build_zoo, reference

from rnnzoo.errors import ResourceExhausted
from rnnzoo.server.runtime import ModelRepository, Runtime, RuntimeOptions
from rnnzoo.server.runtime.caller import CALLER, Caller
from rnnzoo.server.runtime.jobs import LongJobs

TOL = 1e-5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    refs = build_zoo(d)
    return ModelRepository.from_dir(d), refs


def seq(t: int, seed: int = 0, f: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(t, f)).astype(np.float32)


async def runtime(repo, **opts) -> Runtime:
    opts.setdefault("session_ttl_s", None)
    rt = Runtime(repo, RuntimeOptions(**opts))
    await rt.start()
    return rt


async def as_caller(key: str, coro):
    CALLER.set(Caller(key))  # this task only
    return await coro


async def test_long_infer_is_sliced_with_state_carried_and_equals_the_reference(zoo):
    repo, refs = zoo
    rt = await runtime(repo, long_job_steps=100)
    try:
        x = np.stack([seq(1500, seed=1), seq(1500, seed=2)])
        outs = await rt.infer("gru", {"x": x})
        assert rt.jobs.slices >= 3  # 2 x 1500 steps: several slices plus the final concat
        for b in range(2):
            want, _ = reference(refs["gru"], x[b : b + 1])
            np.testing.assert_allclose(outs["y"][b], want[0], atol=TOL)
        # from a session, advancing it: the same numbers, and the state moved on exactly
        sid = (await rt.create_session("gru")).id
        a = await rt.infer("gru", {"x": x[:1, :700]}, session_id=sid, advance=True)
        r = await rt.step(sid, {"x": x[0, 700:]})  # a long chunk: the pool again, sliced
        np.testing.assert_allclose(a["y"][0], outs["y"][0, :700], atol=TOL)
        np.testing.assert_allclose(r.outputs["y"], outs["y"][0, 700:], atol=TOL)
        assert (r.start, r.steps_total) == (700, 1500)
    finally:
        await rt.stop()


async def test_bidirectional_prefix_recompute_in_the_pool_equals_offline(zoo):
    repo, refs = zoo
    rt = await runtime(repo, long_job_steps=50)
    try:
        x = seq(120, seed=3)
        sid = (await rt.create_session("bigru")).id
        before = rt.jobs.slices
        for a, b in ((0, 30), (30, 90), (90, 91), (91, 120)):  # the 2nd on: prefix >= 50 steps
            r = await rt.step(sid, {"x": x[a:b]})
            assert (r.start, r.steps_total, r.revised) == (0, b, True)
            want, _ = reference(refs["bigru"], x[None, :b])
            np.testing.assert_allclose(r.outputs["y"], want[0], atol=TOL)
        assert rt.jobs.slices - before == 3  # one unsliced job per long prefix
        assert rt.jobs.jobs == 0 and rt.jobs._busy == 0
    finally:
        await rt.stop()


async def test_long_prompt_generation_equals_the_inline_one(zoo):
    repo, _ = zoo
    texts = []
    for long_steps in (10**6, 64):
        rt = await runtime(repo, long_job_steps=long_steps)
        try:
            pieces = [p async for p in rt.generate("charlm", "abc " * 50, 20, seed=7)]
            texts.append("".join(pieces))
            if long_steps == 64:
                assert rt.jobs.slices >= 1
        finally:
            await rt.stop()
    assert texts[0] == texts[1] and len(texts[0]) == 20


async def test_long_jobs_are_capped_run_one_at_a_time_and_refuse_beyond(zoo):
    repo, _ = zoo
    rt = await runtime(
        repo, long_job_steps=100, long_workers=1, max_long_jobs=3, max_long_jobs_per_client=2
    )
    try:
        x = seq(3000, seed=4)[None]
        whole = await rt.infer("gru", {"x": x})

        async def one(key: str):
            try:
                return await as_caller(key, rt.infer("gru", {"x": x}))
            except ResourceExhausted as exc:
                return exc

        res = await asyncio.gather(one("a"), one("a"), one("a"), one("b"), one("c"))
        errors = [str(r) for r in res if isinstance(r, Exception)]
        assert len(errors) == 2, errors
        assert "max_long_jobs_per_client" in errors[0]  # a's third
        assert "max_long_jobs" in errors[1] and "retry" in errors[1]  # c: server full
        for r in res:
            if not isinstance(r, Exception):
                np.testing.assert_allclose(r["y"], whole["y"], atol=TOL)  # results equal
        assert rt.jobs.peak_busy == 1 and rt.jobs.peak_jobs == 3
        assert rt.jobs.jobs == 0 and rt.jobs._busy == 0
    finally:
        await rt.stop()


async def test_slots_go_round_robin_across_callers():
    jobs = LongJobs(workers=1, max_jobs=10, max_per_client=10, nice=0)
    order: list[str] = []
    lock = threading.Lock()

    def work(key: str) -> None:
        with lock:
            order.append(key)
        time.sleep(0.002)

    async def job(key: str, slices: int) -> None:
        with jobs.admit(key, "a test job"):
            for _ in range(slices):
                await jobs.run_slice(key, work, key)

    try:
        heavy = [asyncio.create_task(job("heavy", 6)) for _ in range(2)]
        await asyncio.sleep(0.001)
        light = asyncio.create_task(job("light", 2))
        await asyncio.gather(*heavy, light)
    finally:
        jobs.shutdown()
    # the light caller's two slices do not wait behind the heavy caller's twelve
    assert order.count("light") == 2
    assert order.index("light") <= 2, order
    last_light = len(order) - 1 - order[::-1].index("light")
    assert last_light <= 5, order


async def test_a_cancelled_waiter_gives_its_slot_back():
    jobs = LongJobs(workers=1, nice=0)
    release = threading.Event()
    try:
        first = asyncio.create_task(jobs.run_slice("a", release.wait, 5))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(jobs.run_slice("b", time.sleep, 0))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        await first
        assert jobs._busy == 0 and not jobs._waiting
        await jobs.run_slice("c", time.sleep, 0)  # the slot is free again
    finally:
        jobs.shutdown()


async def test_worker_threads_run_at_lower_priority():
    import os

    jobs = LongJobs(workers=1, nice=10)
    try:
        nice = await jobs.run_slice(
            "a", lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        )
    finally:
        jobs.shutdown()
    assert nice >= 10
