"""Where a step's write-through goes, part by part, old way and new way side by side in one
run (docs/scale-out.md, "Cost of the write-through").

    python -m rnnzoo.benchmarks.write_parts [--sessions 64] [--batches 300]

For the benchmark model (LSTM, 2 layers, H=128: 2 KB of state per session) and ``--sessions``
sessions, one batch = every session's write once, as the server makes them after one batched
step. Parts, each in microseconds of CPU per session-step (``time.process_time``: this
process; the redis-server's own CPU is given apart), median of 5 repeats:

- ``encode``: the session's snapshot bytes: ``to_bytes`` (before) vs ``StepEncoder`` (now);
- ``step result``: the step's result kept for a retry (``result_to_bytes``): the JSON
  header encoded whole (before) vs the outputs' index cached per layout (now);
- ``redis``: one pipelined round trip of the batch's fenced writes, three ways: a call per
  write with the whole snapshot, through redis-py's ``Pipeline`` and through ``wire.execute``
  (before), and ``RedisStore.write`` (now: one call of the steps script, the initial state's
  bytes kept in the record); under each, the redis-server process's own CPU for those writes
  (the Lua scripts), which shares the machine's cores with rnnzoo;
- ``sqlite``: one transaction of the batch's fenced writes (``SqliteStore``), in this thread.

Needs redis-server on PATH; runs its own on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def _cpu_us_per(fn, n: int, repeats: int = 5) -> float:
    vals = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        vals.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(vals)


async def _acpu_us_per(fn, n: int, repeats: int = 5) -> float:
    vals = []
    for _ in range(repeats):
        t0 = time.process_time()
        await fn()
        vals.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(vals)


def run(sessions: int = 64, batches: int = 300, log=print) -> dict[str, float]:
    from rnnzoo.server.runtime.snapshot import Snapshot, StepEncoder, to_bytes
    from rnnzoo.server.runtime.store import RedisStore, SqliteStore, Write, wire

    from .stores import _free_port

    rng = np.random.default_rng(0)
    shape = (2, 1, 128)  # the benchmark model's h and c, batch 1
    initial = {"h0": np.zeros(shape, np.float32), "c0": np.zeros(shape, np.float32)}
    snaps = []
    for i in range(sessions):
        state = {k: rng.standard_normal(shape).astype(np.float32) for k in initial}
        meta = {"created_at": 1.7e9 + i, "ttl_s": None, "owner": None, "quota_key": None}
        snaps.append(Snapshot("bench_lstm", "ab" * 32, 1000 + i, state, initial, [], {}, meta))
    encoders = [StepEncoder() for _ in snaps]
    n = sessions * batches
    out: dict[str, float] = {}

    def old_encode():
        for _ in range(batches):
            for s in snaps:
                to_bytes(s)

    def new_encode():
        for _ in range(batches):
            for s, e in zip(snaps, encoders, strict=True):
                e.encode(s, initial)

    assert all(e.encode(s, initial) == to_bytes(s) for s, e in zip(snaps, encoders, strict=True))
    out["encode: to_bytes (before)"] = _cpu_us_per(old_encode, n)
    out["encode: StepEncoder (now)"] = _cpu_us_per(new_encode, n)
    from rnnzoo.server.runtime.options import StepResult
    from rnnzoo.server.runtime.snapshot import _pack, result_to_bytes

    results = [
        StepResult({"y": rng.standard_normal((1, 1)).astype(np.float32)}, 1000 + i, 1001 + i, False)
        for i in range(sessions)
    ]

    def old_result():
        for _ in range(batches):
            for r in results:
                head = {"start": r.start, "steps_total": r.steps_total, "revised": r.revised}
                _pack(head, list(r.outputs.items()))

    def new_result():
        for _ in range(batches):
            for r in results:
                result_to_bytes(r)

    out["step result: _pack (before)"] = _cpu_us_per(old_result, n)
    out["step result: result_to_bytes (now)"] = _cpu_us_per(new_result, n)
    blobs = [to_bytes(s) for s in snaps]
    resp = b"\x12" * 40  # a 1-step response's bytes, kept for deduplication

    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        redis = subprocess.Popen(
            [
                *(shutil.which("redis-server") or "redis-server", "--port", str(port)),
                *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)
            out.update(
                asyncio.run(
                    _redis_parts(RedisStore, Write, wire, port, blobs, resp, batches, redis.pid)
                )
            )
        finally:
            redis.terminate()
            redis.wait(10)
        store = SqliteStore(Path(tmp) / "st")
        sids = [f"s{i:04d}" for i in range(sessions)]
        creates = [Write(sid, 0, b, 600.0, create=True) for sid, b in zip(sids, blobs, strict=True)]
        store._write(store._conn(), creates, 30.0)
        writes = [Write(sid, 0, b, 600.0, resp, -1) for sid, b in zip(sids, blobs, strict=True)]

        def sqlite_batches():
            for _ in range(batches):
                assert all(store._write(store._conn(), writes, 30.0))

        out["sqlite: one transaction per batch"] = _cpu_us_per(sqlite_batches, n)
    for k, v in out.items():
        log(f"  {k:<44} {v:7.1f} us CPU per session-step")
    return out


async def _redis_parts(
    RedisStore, Write, wire, port, blobs, resp, batches, pid
) -> dict[str, float]:
    from rnnzoo.server.runtime.snapshot import initial_size

    store = RedisStore(f"redis://127.0.0.1:{port}/0")
    sids = [f"s{i:04d}" for i in range(len(blobs))]
    tail = initial_size_of(blobs[0], initial_size)
    ok = await store.write(
        [
            Write(sid, 0, b, 600.0, create=True, tail=tail)
            for sid, b in zip(sids, blobs, strict=True)
        ],
        30.0,
    )
    assert all(ok)
    script = store._scripts["write"]
    for sid in sids:  # leased, as a stream's writes are (the script refreshes the lease)
        assert (await store.acquire(sid, "bench/1", 30.0)).ok
    # position -1: no position check (the same writes again and again)
    writes = [Write(sid, 1, b, 600.0, resp, -1) for sid, b in zip(sids, blobs, strict=True)]
    calls = store.write_calls(writes, 30.0)
    client = store._client
    for w in writes:
        w.tail = tail

    async def old():  # a call per write, each with the initial state's bytes
        for _ in range(batches):
            pipe = client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            assert all(await pipe.execute())

    async def per_call():
        for _ in range(batches):
            packed = [wire.evalsha(script.sha, keys, args) for keys, args in calls]
            assert all(await wire.execute(client, packed))

    async def new():  # one call of the steps script, without the initial state's bytes
        for _ in range(batches):
            assert all(await store.write(writes, 30.0))

    from .load import _cpu_s

    n = len(blobs) * batches
    out = {}
    for name, way in (
        ("redis-py Pipeline, a call a write", old),
        ("wire.execute, a call a write", per_call),
        ("store.write, one call, no tail (now)", new),
    ):
        cpu0 = _cpu_s(pid)
        out[f"redis: {name}"] = await _acpu_us_per(way, n)
        cpu1 = _cpu_s(pid)
        if cpu0 is not None and cpu1 is not None:  # 5 repeats, above
            out["  its redis-server CPU" + " " * len(out)] = (cpu1 - cpu0) / (5 * n) * 1e6
    await store.close()
    return out


def initial_size_of(blob: bytes, initial_size) -> int:
    """The initial state's bytes at the end of a snapshot's bytes."""
    from rnnzoo.server.runtime.snapshot import from_bytes

    return initial_size(from_bytes(blob))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--batches", type=int, default=300)
    a = p.parse_args(argv)
    run(a.sessions, a.batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
