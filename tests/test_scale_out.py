"""Sessions that outlive the process: the SQLite (DIR) and Redis state stores behind real
``rnnzoo serve`` processes, restarts (SIGTERM, kill -9), leases across processes, fencing,
and a replica killed behind nginx. redis-server and nginx are real (scripts/setup.sh
installs them); each test starts and stops its own instances."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import grpc
import numpy as np
import pytest
from scaleout_harness import Nginx, Redis, Serve, free_port

from rnnzoo.client import Client, RpcError
from rnnzoo.server.runtime.store import MemoryStore, RedisStore, SqliteStore, Write

EXACT = 1e-6


def _x(steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, 3)).astype(np.float32)


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path)
    yield r
    r.stop()


def _offline(zoo_target: str, model: str, x: np.ndarray) -> np.ndarray:
    with Client(zoo_target) as c:
        return c.infer(model, x[None])["y"][0]


def _open(target: str) -> Client:
    c = Client(target, timeout=20, retry_s=30)
    c.wait_ready(20)
    return c


def _resume(c: Client, sid: str, model: str, position: int, x: np.ndarray, wait_s: float = 15):
    """Step a resumed session, waiting out a dead owner's lease."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return c.resume(sid, model, position).step(x)
        except RpcError as err:
            if "lease runs out" not in err.details() or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_restart_loses_no_session_and_no_acknowledged_step(zoo, state_store, tmp_path, how):
    srv = Serve(zoo, state_store, tmp_path, "--lease-ttl", "2")
    xs = {m: _x(12, i) for i, m in enumerate(["lstm2", "gru", "rnn"])}
    try:
        c = _open(srv.target)
        refs = {m: c.infer(m, x[None])["y"][0] for m, x in xs.items()}
        sessions = {}
        for m, x in xs.items():
            s = c.session(m)
            got = [s.step(x[t]).value for t in range(7)]  # 7 acknowledged steps, stream open
            sessions[m] = (s.id, got)
        if how == "sigterm":
            assert srv.term() == 0
        else:
            srv.kill9()  # the streams' leases stay in the store until they run out
        c.close()
        srv.stop()
        srv = Serve(zoo, state_store, tmp_path, "--lease-ttl", "2")
        c = _open(srv.target)
        for m, (sid, got) in sessions.items():
            t0 = time.monotonic()
            rest = _resume(c, sid, m, 7, xs[m][7:])
            waited = time.monotonic() - t0
            assert rest.start == 7 and rest.steps_total == 12  # 0 acknowledged steps lost
            np.testing.assert_allclose(np.concatenate([*got, rest.value]), refs[m], atol=EXACT)
            if how == "sigterm":
                assert waited < 1.5  # a clean stop released its leases
        c.close()
    finally:
        srv.stop()


def test_store_files_are_private(tmp_path):
    d = tmp_path / "st"
    SqliteStore(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for f in d.iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f


@pytest.mark.parametrize("kind", ["memory", "dir", "redis"])
def test_fencing_a_paused_old_owner_cannot_overwrite(kind, tmp_path):
    async def go(st):
        assert (await st.write([Write("s1", 0, b"v0", 60, create=True)], 1.0)) == [True]
        a = await st.acquire("s1", "A", 0.3)
        assert a.ok and a.record.snap == b"v0"
        b = await st.acquire("s1", "B", 0.3)  # A's lease is alive
        assert not b.ok and 0 < b.held_for_s <= 0.3
        assert (await st.write([Write("s1", a.epoch, b"A1", 60)], 0.3)) == [True]
        await asyncio.sleep(0.45)  # A pauses past its lease
        b = await st.acquire("s1", "B", 5)
        assert b.ok and b.epoch == a.epoch + 1 and b.record.snap == b"A1"
        # the old owner wakes up and writes: fenced off, in the same round trip
        assert (await st.write([Write("s1", a.epoch, b"A2", 60)], 5)) == [False]
        assert (await st.renew([("s1", "A", a.epoch)], 5)) == [False]
        # a write from outside a stream is refused while B's lease lives
        assert (await st.write([Write("s1", b.epoch, b"X", 60, leased=False)], 5)) == [False]
        assert (await st.write([Write("s1", b.epoch, b"B1", 60)], 5)) == [True]
        assert (await st.load("s1")).snap == b"B1"
        await st.release("s1", "B", b.epoch)
        assert (await st.load("s1")).holder == ""
        await st.close()

    if kind == "memory":
        asyncio.run(go(MemoryStore()))
    elif kind == "dir":
        asyncio.run(go(SqliteStore(tmp_path / "st")))
    else:
        r = Redis(tmp_path, password="s3cret")
        try:
            asyncio.run(go(RedisStore(r.url())))
        finally:
            r.stop()


def test_redis_auth_ttl_and_down_is_unavailable(zoo, tmp_path):
    r = Redis(tmp_path, password="s3cret")
    srv = Serve(zoo, r.url(), tmp_path, "--session-ttl", "30")
    try:
        c = _open(srv.target)
        s = c.session("gru")
        s.step(_x(2, 1))
        import redis as redis_py

        raw = redis_py.Redis(port=r.port, password="s3cret")
        key = f"rnnzoo:s:{s.id}"
        assert 0 < raw.pttl(key) <= 30_000  # bounded: the session's idle TTL
        raw.close()
        s.detach()
        r.stop()
        with pytest.raises(RpcError) as info:
            c.session("gru")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "state store" in info.value.details() and "s3cret" not in info.value.details()
        c.close()
    finally:
        srv.stop()
        r.stop()


def test_a_second_process_cannot_advance_a_leased_session_until_its_owner_dies(
    zoo, redis, tmp_path
):
    a = Serve(zoo, redis.url(), tmp_path, "--lease-ttl", "2")
    b = Serve(zoo, redis.url(), tmp_path, "--lease-ttl", "2")
    x = _x(9, 3)
    try:
        ca, cb = _open(a.target), _open(b.target)
        ref = ca.infer("lstm2", x[None])["y"][0]
        s = ca.session("lstm2")
        first = s.step(x[:4])  # A's stream holds the lease
        with pytest.raises(RpcError) as info:
            cb.resume(s.id, "lstm2", 4).step(x[4:])
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "another server process" in info.value.details()
        with pytest.raises(RpcError) as info:
            cb.infer("lstm2", x[None, 4:], session_id=s.id, advance=True)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        time.sleep(3)  # A stays alive: it renews its lease (TTL 2 s)
        with pytest.raises(RpcError):
            cb.resume(s.id, "lstm2", 4).step(x[4:])
        a.kill9()
        rest = _resume(cb, s.id, "lstm2", 4, x[4:])  # the dead owner's lease runs out
        np.testing.assert_allclose(np.concatenate([first.value, rest.value]), ref, atol=EXACT)
        cb.close()
    finally:
        a.stop()
        b.stop()


def test_replica_killed_behind_nginx_client_retries_exactly(zoo, redis, tmp_path):
    r1 = Serve(zoo, redis.url(), tmp_path, "--lease-ttl", "2")
    port2 = free_port()
    ng = Nginx(tmp_path, [r1.port, port2])  # replica 2 is not up yet: nginx uses replica 1
    r2 = None
    x = _x(40, 8)
    try:
        c = _open(ng.target)
        ref = c.infer("lstm2", x[None])["y"][0]
        s = c.session("lstm2")
        got = [s.step(x[t]).value for t in range(20)]
        r2 = Serve(zoo, redis.url(), tmp_path, "--lease-ttl", "2", port=port2)
        r1.kill9()  # mid-session: the stream's replica dies
        got += [s.step(x[t]).value for t in range(20, 40)]
        assert s.retries >= 1
        np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-5)
        print("statuses seen by the client when its replica died:", s.failures)
        c.close()
    finally:
        for p in (ng, r1, r2):
            if p is not None:
                p.stop()


def test_writes_are_grouped_per_batch_not_per_session(zoo, redis):
    """16 sessions stepping at once: their write-throughs share store round trips."""
    import threading

    from rnnzoo.server.runtime import Runtime, RuntimeOptions
    from rnnzoo.server.transport import BackgroundServer

    store = RedisStore(redis.url())
    # A long batching delay: the batcher waits until every attached stream has its chunk
    # queued, so the grouping does not depend on how busy the machine is (with 2 ms it fell
    # to 110 round trips for 320 steps on a loaded CI host).
    opts = RuntimeOptions(session_ttl_s=None, max_delay_ms=1000.0)
    steps, n = 20, 16
    with BackgroundServer(
        lambda: Runtime(Runtime.from_dir(zoo, opts).repo, opts, None, store)
    ) as srv:
        c = _open(srv.target)
        sessions = [c.session("gru") for _ in range(n)]
        before = store.round_trips
        barrier = threading.Barrier(n)

        def run(s):
            barrier.wait()
            for t in range(steps):
                s.step(_x(1, t))

        threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        trips = store.round_trips - before
        c.close()
    print(f"{trips} store round trips for {n * steps} session steps")
    assert all(s.position == steps for s in sessions)
    assert trips <= n * steps / 3, trips  # one per session and step would be 320


def test_a_store_made_before_shared_quotas_gains_their_column_and_still_reads(tmp_path):
    import sqlite3

    d = tmp_path / "old"
    d.mkdir()
    conn = sqlite3.connect(d / "sessions.sqlite3")
    conn.execute(
        "CREATE TABLE sessions (sid TEXT PRIMARY KEY, snap BLOB NOT NULL, epoch INTEGER NOT NULL "
        "DEFAULT 0, holder TEXT NOT NULL DEFAULT '', lexp REAL NOT NULL DEFAULT 0, resp BLOB, "
        "rpos INTEGER NOT NULL DEFAULT -1, expires REAL NOT NULL)"
    )
    conn.execute("INSERT INTO sessions (sid, snap, expires) VALUES ('s1', x'00', 1e12)")
    conn.commit()
    conn.close()
    store = SqliteStore(d)

    async def go():
        assert (await store.load("s1")).snap == b"\x00"  # the old row reads as before
        w = Write("s2", 0, b"\x01", 60.0, create=True, quota_key="principal:a", quota_max=1)
        assert await store.write([w], 30.0) == [True]
        w2 = Write("s3", 0, b"\x02", 60.0, create=True, quota_key="principal:a", quota_max=1)
        assert await store.write([w2], 30.0) == [None]  # over the quota, counted in the store
        assert await store.take_tokens("principal:a", 3, rate=1.0, burst=2.0) == 2

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["memory", "dir", "redis"])
def test_a_dead_process_leases_are_freed_by_its_tag_and_no_others(kind, tmp_path):
    async def go(st):
        for sid in ("s1", "s2", "s3"):
            assert (await st.write([Write(sid, 0, b"v", 60, create=True)], 1.0)) == [True]
        a1 = await st.acquire("s1", "host/11:aa", 60)
        a2 = await st.acquire("s2", "host/11:bb", 60)
        b = await st.acquire("s3", "host/111:cc", 60)  # a tag that merely starts the same
        assert a1.ok and a2.ok and b.ok
        assert await st.release_holders("host/11:") == 2
        for sid, old in (("s1", a1), ("s2", a2)):  # free now, not in 60 s; the epoch moves on
            got = await st.acquire(sid, "host/12:dd", 60)
            assert got.ok and got.epoch == old.epoch + 1
        assert not (await st.acquire("s3", "host/12:ee", 60)).ok  # the live process's lease
        assert await st.release_holders("host/11:") == 0
        await st.close()

    if kind == "memory":
        asyncio.run(go(MemoryStore()))
    elif kind == "dir":
        asyncio.run(go(SqliteStore(tmp_path / "st")))
    else:
        r = Redis(tmp_path)
        try:
            asyncio.run(go(RedisStore(r.url())))
        finally:
            r.stop()


def test_the_memory_store_counts_quotas_and_buckets_as_the_shared_stores_do():
    async def go():
        st = MemoryStore()
        q = {"quota_key": "principal:a", "quota_max": 1}
        assert await st.write([Write("s1", 0, b"\x01", 60.0, create=True, **q)], 30.0) == [True]
        assert await st.write([Write("s2", 0, b"\x02", 60.0, create=True, **q)], 30.0) == [None]
        assert await st.write([Write("s1", 0, b"\x03", 60.0, create=True)], 30.0) == [False]
        await st.delete("s1")  # a closed session no longer counts
        assert await st.write([Write("s2", 0, b"\x02", 60.0, create=True, **q)], 30.0) == [True]
        assert await st.take_tokens("principal:a", 3, rate=1.0, burst=2.0) == 2
        assert await st.take_tokens("principal:a", 1, rate=1.0, burst=2.0) == 0

    asyncio.run(go())
