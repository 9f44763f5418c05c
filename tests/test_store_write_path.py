"""The state store's per-step write path made cheap (issue 23): the snapshot encoder that
keeps the unchanging header, and Redis pipelines packed by us. Each is checked against what
it replaces (``to_bytes``, redis-py's own packing and pipeline) and against a real
redis-server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from redis.asyncio import Redis as AsyncRedis
from redis.connection import Connection
from redis.exceptions import NoScriptError, ResponseError
from scaleout_harness import Redis

from rnnzoo.server.runtime.model import Chunk
from rnnzoo.server.runtime.snapshot import Snapshot, StepEncoder, from_bytes, to_bytes
from rnnzoo.server.runtime.store import wire


def _snap(steps: int, seed: int, initial: dict, ttl: float | None = None) -> Snapshot:
    rng = np.random.default_rng(seed)
    state = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in initial.items()}
    meta = {"created_at": 1.5e9, "ttl_s": ttl, "owner": "alice", "quota_key": "k"}
    return Snapshot("m", "ab" * 32, steps, state, dict(initial), [], {"ckpt": "x"}, meta)


def test_the_step_encoder_makes_to_bytes_bytes_and_follows_every_change():
    initial = {"h0": np.zeros((2, 1, 4), np.float32), "c0": np.ones((2, 1, 4), np.float32)}
    enc = StepEncoder()
    for steps, seed in ((0, 1), (1, 2), (12345, 3)):  # the header's steps change each step
        snap = _snap(steps, seed, initial)
        assert enc.encode(snap, initial) == to_bytes(snap)
    changed = _snap(7, 4, initial, ttl=30.0)  # meta changed
    assert enc.encode(changed, initial) == to_bytes(changed)
    other = {"h0": np.full((2, 1, 4), 2, np.float32), "c0": np.ones((2, 1, 4), np.float32)}
    snap = _snap(8, 5, other)  # a new initial dict (restore, reset to another state)
    assert enc.encode(snap, other) == to_bytes(snap)
    other["h0"] = np.full((2, 1, 4), 3, np.float32)  # an initial array replaced in place
    snap = _snap(9, 6, other)
    assert enc.encode(snap, other) == to_bytes(snap)
    assert from_bytes(enc.encode(snap, other)).initial["h0"][0, 0, 0] == 3
    snap.state = {k: v.transpose(2, 1, 0).copy().transpose(2, 1, 0) for k, v in snap.state.items()}
    assert enc.encode(snap, other) == to_bytes(snap)  # non-contiguous arrays: C order
    snap.buffer = [Chunk({"x": np.zeros((3, 2), np.float32)}, 3)]  # a buffered prefix
    assert enc.encode(snap, other) == to_bytes(snap)


def test_the_step_encoder_keeps_its_header_for_one_sessions_steps_and_follows_a_new_layout():
    # as the server makes them: one meta, source and initial dict for the session's steps
    initial = {"h0": np.zeros((2, 1, 4), np.float32), "c0": np.ones((2, 1, 4), np.float32)}
    meta = {"created_at": 1.5e9, "ttl_s": None, "owner": "alice", "quota_key": "k"}
    source = {"ckpt": "x"}
    enc = StepEncoder()
    rng = np.random.default_rng(0)

    def step(steps: int, state: dict, meta: dict = meta) -> None:
        snap = Snapshot("m", "ab" * 32, steps, state, initial, [], source, meta)
        assert enc.encode(snap, initial) == to_bytes(snap)

    for steps in (0, 1, 9, 10, 12345678901):  # the steps value's width changes
        step(
            steps, {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in initial.items()}
        )
    step(3, {k: v.astype(np.float64) for k, v in initial.items()})  # another dtype
    step(4, {k: np.zeros((2, 2, 4), np.float32) for k in initial})  # another shape
    step(5, {"c0": initial["c0"], "h0": initial["h0"]})  # another order
    step(6, {"h0": initial["h0"]})  # fewer arrays
    step(7, dict(initial), {**meta, "ttl_s": 30.0})  # a session copy's new meta dict


def test_packed_commands_are_byte_for_byte_redis_pys():
    pack = Connection().pack_command
    args = [3, b"\x00snap\r\n", b"", -1, 600_000, 1, 0, 30_000, 1.5, "t\u00e9xt"]
    assert wire.evalsha("a" * 40, ["rnnzoo:s:x"], args) == b"".join(
        pack("EVALSHA", "a" * 40, 1, "rnnzoo:s:x", *args)
    )
    assert wire.evalsha("b" * 40, ["k1", "k2"], []) == b"".join(
        pack("EVALSHA", "b" * 40, 2, "k1", "k2")
    )
    with pytest.raises(TypeError):
        wire.arg(None)


@pytest.mark.parametrize("tails", [False, True])
def test_a_batchs_writes_packed_directly_are_byte_for_byte_their_calls_packed_generically(tails):
    from rnnzoo.server.runtime.store import RedisStore, Write

    store = RedisStore("redis://127.0.0.1:1/0", max_ttl_s=100.0)  # never connected
    store.STEPS_PER_CALL = 2
    snap = bytes(range(256)) * 9
    writes = [
        Write("a", 3, snap, 60.0, b"resp", 7, True, steps=8, tail=1024),
        Write("d", 0, snap, 60.0, create=True, quota_key="k", quota_max=2, steps=0, tail=64),
        Write("b\u00e9", 0, snap, 600.0, None, -1, False),  # no tail; ttl over max_ttl_s
        Write("c", 12, snap, 0.0001, b"", 0, True, steps=1, tail=len(snap)),
    ]
    packed, carried = store.write_commands(writes, 30.0, tails)
    steps_sha, write_sha = store._scripts["steps"].sha, store._scripts["write"].sha
    assert carried == [[1], [0, 2], [3]]  # a create alone; the steps in calls of 2
    assert packed == [
        wire.evalsha(write_sha, *store.write_calls([writes[1]], 30.0, tails)[0]),
        wire.evalsha(steps_sha, *store.steps_call([writes[0], writes[2]], 30.0, tails)),
        wire.evalsha(steps_sha, *store.steps_call([writes[3]], 30.0, tails)),
    ]


@pytest.mark.parametrize("parser", ["hiredis", "python"])
def test_a_packed_pipeline_returns_every_reply_with_error_replies_in_place(tmp_path, parser):
    if parser == "hiredis":
        pytest.importorskip("hiredis")
        from redis._parsers import _AsyncHiredisParser as parser_class
    else:
        from redis._parsers import _AsyncRESP3Parser as parser_class  # redis-py 8: RESP3
    server = Redis(tmp_path)

    async def go():
        from redis.asyncio import ConnectionPool

        pool = ConnectionPool(port=server.port, parser_class=parser_class)
        client = AsyncRedis(connection_pool=pool)
        try:
            big = bytes(range(256)) * 300  # over one socket read
            sha = await client.script_load("return ARGV[1]")
            packed = [
                wire.command([b"SET", b"k", big]),
                wire.evalsha("0" * 40, ["k"], []),  # no such script
                wire.command([b"GET", b"k"]),
                wire.evalsha(sha, ["k"], [b"echo"]),
                wire.command([b"INCR", b"k"]),  # a value that is not an integer
            ]
            for _ in range(3):  # the connection is reused cleanly
                got = await wire.execute(client, packed)
                assert got[0] is True or got[0] == b"OK"
                assert isinstance(got[1], NoScriptError)
                assert got[2] == big and got[3] == b"echo"
                assert isinstance(got[4], ResponseError)
            assert await wire.execute(client, []) == []
            conn = await pool.get_connection()
            assert type(conn._parser) is parser_class  # the path under test ran
            await pool.release(conn)
        finally:
            await client.aclose()

    try:
        asyncio.run(go())
    finally:
        server.stop()


def test_a_step_result_encodes_as_pack_does_and_reads_back():
    from rnnzoo.server.runtime.options import StepResult
    from rnnzoo.server.runtime.snapshot import _pack, result_from_bytes, result_to_bytes

    rng = np.random.default_rng(0)
    for steps, revised in ((1, False), (7, True), (1, False)):  # a layout seen again: cached
        outs = {
            "y": rng.standard_normal((steps, 2)).astype(np.float32),
            "ids": np.arange(steps, dtype=np.int64),
            "t": rng.standard_normal((3, steps)).astype(np.float32).T,  # not C-contiguous
        }
        res = StepResult(outs, 40, 40 + steps, revised)
        head = {"start": 40, "steps_total": 40 + steps, "revised": revised}
        data = result_to_bytes(res)
        assert data == _pack(head, list(outs.items()))
        back = result_from_bytes(data)
        assert (back.start, back.steps_total, back.revised) == (40, 40 + steps, revised)
        for k, v in outs.items():
            np.testing.assert_array_equal(back.outputs[k], v)


def test_the_redis_store_names_its_driver_version_once_not_per_connection():
    import redis

    from rnnzoo.server.runtime.store import RedisStore

    store = RedisStore("redis://127.0.0.1:1/0")  # never connected
    info = store._client.connection_pool.connection_kwargs["driver_info"]
    assert info is wire.driver_info()["driver_info"] and info.lib_version == redis.__version__


def test_a_sqlite_batch_with_a_fenced_write_applies_the_others_and_says_which(tmp_path):
    from rnnzoo.server.runtime.store import SqliteStore, Write

    store = SqliteStore(tmp_path / "st")
    conn = store._conn()
    sids = ["a", "b", "c"]
    assert (
        store._write(conn, [Write(s, 0, b"v0", 60.0, create=True) for s in sids], 30.0)
        == [True] * 3
    )
    steps = [Write(s, 0, b"v1-" + s.encode(), 60.0, b"r", -1) for s in sids]
    assert store._write(conn, steps, 30.0) == [True, True, True]
    fenced = [Write(s, 0, b"v2-" + s.encode(), 60.0, b"r", -1) for s in sids]
    fenced[1].epoch = 7  # b's writer holds an old epoch: fenced off
    assert store._write(conn, fenced, 30.0) == [True, False, True]
    snaps = dict(conn.execute("SELECT sid, snap FROM sessions").fetchall())
    assert snaps == {"a": b"v2-a", "b": b"v1-b", "c": b"v2-c"}


def _sqlite_rows(conn) -> dict[str, tuple]:
    rows = conn.execute("SELECT sid, snap, resp, rpos, steps, holder FROM sessions")
    return {sid: tuple(rest) for sid, *rest in rows}


def test_a_sqlite_batch_refuses_each_fenced_write_by_name_and_applies_the_rest(tmp_path):
    from rnnzoo.server.runtime.store import SqliteStore, Write

    store = SqliteStore(tmp_path / "st")
    conn = store._conn()
    sids = ["ok", "stale", "moved", "held", "free", "mine", "gone"]
    creates = [Write(s, 0, b"v0", 60.0, create=True, steps=0) for s in sids]
    assert store._write(conn, creates, 30.0) == [True] * 7
    conn.execute("DELETE FROM sessions WHERE sid='gone'")  # deleted, or expired and swept
    held = store._acquire(conn, "held", "other/1", 30.0)  # a live lease another process holds
    mine = store._acquire(conn, "mine", "me/1", 0.5)
    (lexp_before,) = conn.execute("SELECT lexp FROM sessions WHERE sid='mine'").fetchone()
    batch = [
        Write("ok", 0, b"v1", 60.0, b"r-ok", 0, steps=1),
        Write("stale", 7, b"v1", 60.0, b"r", 0, steps=1),  # an old epoch: fenced off
        Write("moved", 0, b"v1", 60.0, b"r", 3, steps=4),  # not at position 3: refused
        Write("held", held.epoch, b"v1", 60.0, b"r", 0, leased=False, steps=1),
        Write("free", 0, b"v1", 60.0, b"r-free", 0, leased=False, steps=1),
        Write("mine", mine.epoch, b"v1", 60.0, b"r-mine", 0, steps=1),
        Write("gone", 0, b"v1", 60.0, b"r", 0, steps=1),  # no such session: not recreated
    ]
    assert store._write(conn, batch, 30.0) == [True, False, False, False, True, True, False]
    assert _sqlite_rows(conn) == {
        "ok": (b"v1", b"r-ok", 0, 1, ""),
        "stale": (b"v0", None, -1, 0, ""),
        "moved": (b"v0", None, -1, 0, ""),
        "held": (b"v0", None, -1, 0, "other/1"),
        "free": (b"v1", b"r-free", 0, 1, ""),
        "mine": (b"v1", b"r-mine", 0, 1, "me/1"),
    }
    (lexp,) = conn.execute("SELECT lexp FROM sessions WHERE sid='mine'").fetchone()
    assert lexp > lexp_before + 20  # the leased write renewed its lease, as a lone one does
    # the same writes again (a retry): each is now at the wrong position, refused, unchanged
    assert store._write(conn, batch, 30.0) == [False] * 7
    assert _sqlite_rows(conn)["ok"] == (b"v1", b"r-ok", 0, 1, "")


def test_a_sqlite_batch_naming_one_session_twice_applies_both_writes_in_order(tmp_path):
    from rnnzoo.server.runtime.store import SqliteStore, Write

    store = SqliteStore(tmp_path / "st")
    conn = store._conn()
    batch = [
        Write("a", 0, b"a0", 60.0, create=True, steps=0),
        Write("a", 0, b"a1", 60.0, b"r1", 0, steps=1),  # the step right after the create
        Write("b", 0, b"b0", 60.0, create=True, steps=0),
        Write("a", 0, b"a2", 60.0, b"r2", 1, steps=2),  # a's next step, in the same call
        Write("b", 0, b"b1", 60.0, b"r1", 0, steps=1),
        Write("a", 0, b"a2'", 60.0, b"r2'", 1, steps=2),  # a duplicate of a's second step
    ]
    assert store._write(conn, batch, 30.0) == [True, True, True, True, True, False]
    rows = _sqlite_rows(conn)
    assert rows == {"a": (b"a2", b"r2", 1, 2, ""), "b": (b"b1", b"r1", 0, 1, "")}


def test_a_sqlite_batch_over_one_statement_says_which_write_of_each_part_landed(tmp_path):
    from rnnzoo.server.runtime.store import SqliteStore, Write
    from rnnzoo.server.runtime.store.sqlite import _ROWS_PER_STATEMENT

    store = SqliteStore(tmp_path / "st")
    conn = store._conn()
    n = _ROWS_PER_STATEMENT + 10
    sids = [f"s{i}" for i in range(n)]
    assert all(store._write(conn, [Write(s, 0, b"0", 60.0, create=True) for s in sids], 30.0))
    refused = {3, _ROWS_PER_STATEMENT + 5}
    batch = [Write(s, 9 if i in refused else 0, b"1", 60.0, b"r", -1) for i, s in enumerate(sids)]
    assert store._write(conn, batch, 30.0) == [i not in refused for i in range(n)]
    snaps = dict(conn.execute("SELECT sid, snap FROM sessions").fetchall())
    assert snaps == {s: b"0" if i in refused else b"1" for i, s in enumerate(sids)}


def test_two_sqlite_stores_on_one_file_never_take_each_others_write_ids_for_their_own(tmp_path):
    from rnnzoo.server.runtime.store import SqliteStore, Write

    a, b = SqliteStore(tmp_path / "st"), SqliteStore(tmp_path / "st")  # two processes' worth
    ca, cb = a._conn(), b._conn()
    assert a._write(ca, [Write(s, 0, b"0", 60.0, create=True) for s in "xy"], 30.0) == [True] * 2
    assert a._write(ca, [Write("x", 0, b"a", 60.0, b"r", -1)], 30.0) == [True]
    # b's first write ids, were they counted from where a's were, would name a's row of x
    refused = [Write("x", 3, b"b", 60.0, b"r", -1), Write("y", 3, b"b", 60.0, b"r", -1)]
    assert b._write(cb, refused, 30.0) == [False, False]
    assert dict(cb.execute("SELECT sid, snap FROM sessions")) == {"x": b"a", "y": b"0"}


def test_a_sqlite_store_made_before_write_ids_gains_their_column_and_takes_batches(tmp_path):
    import sqlite3

    from rnnzoo.server.runtime.store import SqliteStore, Write

    SqliteStore(tmp_path / "st")
    old = sqlite3.connect(tmp_path / "st" / "sessions.sqlite3")
    old.execute("ALTER TABLE sessions DROP COLUMN wid")
    old.execute("INSERT INTO sessions (sid, snap, expires) VALUES ('old', x'00', 1e12)")
    old.commit()
    old.close()
    store = SqliteStore(tmp_path / "st")
    conn = store._conn()
    batch = [Write("old", 0, b"1", 60.0, b"r", -1), Write("old2", 1, b"1", 60.0, b"r", -1)]
    assert store._write(conn, batch, 30.0) == [True, False]
    assert conn.execute("SELECT snap FROM sessions WHERE sid='old'").fetchone() == (b"1",)


def test_a_redis_record_keeps_its_initial_state_apart_and_an_older_whole_record_still_reads(
    tmp_path,
):
    from rnnzoo.server.runtime.snapshot import initial_size
    from rnnzoo.server.runtime.store import RedisStore, Write

    initial = {"h0": np.zeros((2, 1, 4), np.float32), "c0": np.ones((2, 1, 4), np.float32)}
    snaps = [to_bytes(_snap(steps, steps, initial)) for steps in range(4)]
    n = initial_size(_snap(0, 0, initial))
    assert n == 64 and all(s.endswith(snaps[0][-n:]) for s in snaps)
    server = Redis(tmp_path)

    async def go() -> None:
        store = RedisStore(server.url())
        raw = AsyncRedis(port=server.port)
        try:
            # a create sends the tail; a step sends the rest only, and reads back whole
            assert await store.write([Write("a", 0, snaps[0], 60.0, create=True, tail=n)], 30.0)
            assert await raw.hget("rnnzoo:s:a", "tail") == snaps[0][-n:]
            step = Write("a", 0, snaps[1], 60.0, b"r1", 0, False, steps=1, tail=n)
            assert await store.write([step], 30.0) == [True]
            assert await raw.hget("rnnzoo:s:a", "snap") == snaps[1][:-n]
            assert (await store.load("a")).snap == snaps[1]  # type: ignore[union-attr]
            # fencing and the position check come first
            late = Write("a", 0, snaps[2], 60.0, b"r", 0, False, steps=1, tail=n)
            assert await store.write([late, Write("a", 5, snaps[2], 60.0, tail=n)], 30.0) == [
                False,
                False,
            ]
            # a batch: creates and steps in their calls, each result in its write's place
            mixed = [
                Write("a", 0, snaps[2], 60.0, b"r2", 1, False, steps=2, tail=n),
                Write("new", 0, snaps[0], 60.0, create=True, tail=n),
                Write("a", 9, snaps[3], 60.0, b"r", 2, False, steps=3, tail=n),  # fenced off
                Write("a", 0, snaps[0], 60.0, create=True, tail=n),  # exists
            ]
            assert await store.write(mixed, 30.0) == [True, True, False, False]
            assert (await store.load("a")).snap == snaps[2]  # type: ignore[union-attr]
            # a record as the version before wrote it: whole, no tail field
            await raw.hset(
                "rnnzoo:s:b",
                mapping={"snap": snaps[0], "epoch": 0, "holder": "", "lexp": 0, "resp": ""}
                | {"rpos": -1, "steps": 0},
            )
            assert (await store.load("b")).snap == snaps[0]  # type: ignore[union-attr]
            trips = store.round_trips
            step = Write("b", 0, snaps[1], 60.0, b"r1", 0, False, steps=1, tail=n)
            assert await store.write([step], 30.0) == [True]
            assert store.round_trips == trips + 2  # refused without its tail, sent again
            assert await raw.hget("rnnzoo:s:b", "tail") == snaps[1][-n:]
            got = await store.acquire("b", "h/1", 30.0)
            assert got.record is not None and got.record.snap == snaps[1]
            # a write with no tail (a buffered session's) is whole again
            whole = Write("b", got.epoch, snaps[2], 60.0, b"r2", 1, steps=2)
            assert await store.write([whole], 30.0) == [True]
            assert await raw.hget("rnnzoo:s:b", "tail") == b""
            assert (await store.load("b")).snap == snaps[2]  # type: ignore[union-attr]
            step = Write("b", got.epoch, snaps[3], 60.0, b"r3", 2, steps=3, tail=n)
            assert await store.write([step], 30.0) == [True]
            assert (await store.load("b")).snap == snaps[3]  # type: ignore[union-attr]
        finally:
            await raw.aclose()
            await store.close()

    try:
        asyncio.run(go())
    finally:
        server.stop()


def test_a_closed_sqlite_store_stops_its_thread_and_refuses_calls_by_name(tmp_path):
    from rnnzoo.errors import StoreUnavailable
    from rnnzoo.server.runtime.store import SqliteStore, Write

    async def run() -> None:
        store = SqliteStore(tmp_path / "st")
        assert await store.write([Write("a", 0, b"v0", 60.0, create=True)], 30.0) == [True]
        await store.close()
        assert store._thread._shutdown
        with pytest.raises(StoreUnavailable, match="is closed"):
            await store.load("a")

    asyncio.run(run())
