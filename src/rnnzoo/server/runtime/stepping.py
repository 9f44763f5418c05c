"""One streamed chunk as a transaction: ``Runtime.stepping`` returns a ``Stepping``.

``async with rt.stepping(sid, inputs, lease, position) as result:`` checks and computes the
chunk inside the session's lock and yields its ``StepResult``; the new state is committed when
the block ends without an error (the caller sent the response), and not at all otherwise.

- ``lease``: the calling stream's lease; a session leased by another live stream is
  FailedPrecondition, and so is a lease that ran out (fencing).
- ``position``: the steps the request expects before its chunk (deduplication, durable.py);
  a chunk already applied yields ``StepResult.replay`` (its stored response) and commits
  nothing.
- A caller that sends a response calls ``await result.persist(encode)`` first, ``encode``
  returning the response's bytes: the step is fenced once more and, with a state store,
  written through it with its response. If the send then fails, the block ends with an error
  and this process's copy does not move on, but the store's already has: a retry on a new
  stream adopts the stored state and, with its position, gets the stored response again.
  ``encode`` runs only when the bytes are kept (a position was given, or the session is
  durable); a plain stream never serializes its response twice.

A class rather than an ``asynccontextmanager`` generator: this runs once per streamed
message, and the generator's machinery cost 4.3 µs per use against 1.1 µs for a class
(2-core AMD EPYC).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from rnnzoo.errors import ResourceExhausted

from .lease import Lease
from .options import StepResult
from .redact import sid_tag
from .sessions import Session


class Stepping:
    __slots__ = (
        "_buffer",
        "_epoch",
        "_keep",
        "_lock",
        "_next",
        "_persisted",
        "_sess",
        "_steps0",
        "_total",
        "_written",
        "inputs",
        "lease",
        "position",
        "rt",
        "sid",
    )

    def __init__(
        self,
        rt,
        session_id: str,
        inputs: dict[str, np.ndarray],
        lease: Lease | None,
        position: int | None,
    ) -> None:
        self.rt = rt
        self.sid = session_id
        self.inputs = inputs
        self.lease = lease
        self.position = position
        self._lock: asyncio.Lock | None = None
        self._sess: Session | None = None  # set once a result is computed (None: a replay)
        self._persisted = False
        self._written: bytes | None = None

    async def __aenter__(self) -> StepResult:
        rt, sid, lease = self.rt, self.sid, self.lease
        rt._check()
        if lease is None:
            await rt.durable.fresh(sid)
        sess = rt.store.get(sid)
        entry, graph = rt._single(sess.model, "step")
        if lease is None:  # early, before the lock: another stream owns this session
            rt._check_lease(sid, None)
        chunk = graph.validate_chunk(self.inputs)  # before anything is queued or locked
        rt.check_steps(chunk.length, "this chunk")
        lock = sess.lock
        await lock.acquire()
        self._lock = lock
        try:
            return await self._compute(entry, graph, chunk)
        except BaseException:
            self._lock = None
            lock.release()
            raise

    async def _compute(self, entry, graph, chunk) -> StepResult:
        rt, sid, lease = self.rt, self.sid, self.lease
        sess = rt.store.get(sid)  # closed/expired while waiting?
        rt._check_lease(sid, lease)  # the authoritative check: renews a stream's lease
        epoch = sess.epoch
        replay = rt.durable.check_position(sess, self.position)
        if replay is not None:
            return StepResult({}, 0, sess.steps, False, replay=replay)
        batcher = rt.batchers[(sess.model, "model")]
        steps0 = sess.steps
        total = steps0 + chunk.length
        options = rt.options
        if entry.info.streamable:
            rt._check_output(graph, 1, chunk.length, "this chunk")
            if chunk.length >= options.long_job_steps:
                outs, nxt = await rt.compute.long_chunk(graph, chunk, sess.state, True)
            else:
                outs, nxt = await batcher.submit(sid, chunk, sess.state)
            rt._check_epoch(sess, epoch)
            buffer = None
        else:
            if total > options.max_buffer_steps:
                raise ResourceExhausted(
                    f"session {sid_tag(sid)} of non-streamable model {sess.model!r} would "
                    f"hold {total} steps, over the server's max_buffer_steps="
                    f"{options.max_buffer_steps}; reset the session or start a new one"
                )
            rt._check_output(graph, 1, total, "this chunk's revised prefix")
            prefix = graph.concat_chunks([*sess.buffer, chunk])
            if total >= options.long_job_steps:  # a bidirectional net: one slice
                outs, nxt = await rt.compute.long_chunk(graph, prefix, sess.initial, False)
            else:
                outs, nxt = await batcher.submit(sid, prefix, sess.initial)
            rt._check_epoch(sess, epoch)
            buffer = [*sess.buffer, chunk]
        self._sess, self._epoch, self._next, self._total = sess, epoch, nxt, total
        self._buffer, self._steps0 = buffer, steps0
        self._keep = self.position is not None or sess.durable
        start = steps0 if buffer is None else 0
        return StepResult(outs, start, total, buffer is not None, persist=self.persist)

    async def persist(self, encode: Callable[[], bytes] | None) -> None:
        """Fence the step again and write it through the state store (if any) before its
        response goes out; ``encode()``: the response's bytes, asked for only when kept."""
        resp = encode() if encode is not None and self._keep else None
        sess = self._sess
        await self.rt._persist(
            sess, self._epoch, self.lease, self._next, self._total, self._buffer, resp, self._steps0
        )
        self._persisted, self._written = True, resp

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        lock, self._lock = self._lock, None
        try:
            if exc_type is None and self._sess is not None:
                await self._commit()
        finally:
            if lock is not None:
                lock.release()
        return False

    async def _commit(self) -> None:
        rt, sess = self.rt, self._sess
        if not self._persisted:
            if not rt._may_commit(sess, self._epoch, self.lease):
                return
            if sess.durable and rt.durable.store is not None:  # a caller without persist
                await self.persist(None)
        sess.state, sess.steps = self._next, self._total
        if self._buffer is not None:
            sess.buffer = self._buffer
        resp = self._written
        sess.last = (self._steps0, resp) if self._keep and resp is not None else None
