"""What a session transaction computes (transaction.py): one ``Change`` per kind.

- ``chunk``: one streamed chunk (rnnzoo.v1 Stream, a KServe sequence's request). Streamable
  models: the chunk's own outputs from the session's state (``start`` = steps before it).
  Non-streamable (bidirectional) models: the session buffers the chunks so far and each step
  re-runs the whole prefix from the initial state, returning exact outputs for all of it
  (``start=0``, ``revised=True``); a prefix over ``max_buffer_steps`` is ResourceExhausted;
- ``chunk`` with ``Prepared.restart``: a KServe ``sequence_start`` on an active sequence: the
  chunk from the initial state, replacing the sequence's state;
- ``advance``: Infer(advance=true): a batch-1 whole request from the session's state;
- ``reset``: back to the initial state.

Small chunks run in the batcher, long ones (``long_job_steps`` or more) in the long-job pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass

import numpy as np

from rnnzoo.contract import Contract
from rnnzoo.errors import ResourceExhausted

from .batching import Batcher
from .catalog import Catalog
from .compute import Compute
from .model import Chunk, ServedModel
from .options import RuntimeOptions, StepResult
from .redact import sid_tag
from .repository import ServedEntry
from .sessions import Session
from .transaction import Change


@dataclass(slots=True)
class Prepared:
    """A chunk validated before the transaction (before anything is queued or locked), with
    the entry and graph it was validated against."""

    entry: ServedEntry
    graph: ServedModel
    chunk: Chunk
    restart: bool = False  # from the initial state (a KServe sequence_start on an active one)


class Stepper:
    def __init__(
        self,
        catalog: Catalog,
        batchers: dict[tuple[str, str], Batcher],
        compute: Compute,
        options: RuntimeOptions,
    ) -> None:
        self.catalog = catalog
        self.batchers = batchers
        self.compute = compute
        self.options = options

    def prepare(self, model: str, inputs: dict[str, np.ndarray]) -> Prepared:
        """Validate one chunk of a session of ``model`` (its version's key)."""
        entry, graph = self.catalog.single(model, "step")
        chunk = graph.validate_chunk(inputs)
        self.catalog.check_steps(chunk.length, "this chunk")
        return Prepared(entry, graph, chunk)

    async def chunk(self, sess: Session, p: Prepared) -> Change:
        """The chunk from the session's state (or, ``p.restart``, from its initial state: a
        KServe sequence_start on an active sequence). One coroutine: it runs per message."""
        if p.restart:
            state, steps0, buffer = sess.initial, 0, []
        else:
            state, steps0, buffer = sess.state, sess.steps, sess.buffer
        entry, graph, chunk = p.entry, p.graph, p.chunk
        batcher = self.batchers[(sess.model, "model")]
        total = steps0 + chunk.length
        options = self.options
        if entry.info.streamable:
            self.catalog.check_output(graph, 1, chunk.length, "this chunk")
            if chunk.length >= options.long_job_steps:
                outs, nxt = await self.compute.long_chunk(graph, chunk, state, True)
            else:
                outs, nxt = await batcher.submit(sess.id, chunk, state)
            result = StepResult(outs, steps0, total, False)
            return Change(nxt, total, buffer, result, steps0, entry)
        if total > options.max_buffer_steps:
            raise ResourceExhausted(
                f"session {sid_tag(sess.id)} of non-streamable model {sess.model!r} would "
                f"hold {total} steps, over the server's max_buffer_steps="
                f"{options.max_buffer_steps}; reset the session or start a new one"
            )
        self.catalog.check_output(graph, 1, total, "this chunk's revised prefix")
        prefix = graph.concat_chunks([*buffer, chunk])
        if total >= options.long_job_steps:  # a bidirectional net: one slice
            outs, nxt = await self.compute.long_chunk(graph, prefix, sess.initial, False)
        else:
            outs, nxt = await batcher.submit(sess.id, prefix, sess.initial)
        return Change(nxt, total, [*buffer, chunk], StepResult(outs, 0, total, True), steps0, entry)

    def chunk_soon(self, sess: Session, p: Prepared) -> Awaitable[Change]:
        """``chunk``, with its batcher job queued now (StepMany queues every chunk of a message
        before awaiting any: no task per chunk). A chunk that ``chunk`` would not hand to the
        batcher (a restart, a long job, a non-streamable model's prefix) runs as its own task,
        so it still runs beside the others."""
        entry, graph, chunk = p.entry, p.graph, p.chunk
        if p.restart or not entry.info.streamable or chunk.length >= self.options.long_job_steps:
            return asyncio.ensure_future(self.chunk(sess, p))
        self.catalog.check_output(graph, 1, chunk.length, "this chunk")
        steps0, buffer = sess.steps, sess.buffer

        def change(result: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]) -> Change:
            outs, nxt = result
            total = steps0 + chunk.length
            return Change(nxt, total, buffer, StepResult(outs, steps0, total, False), steps0, entry)

        # the future's result is the Change itself: no coroutine per chunk to make it
        return self.batchers[(sess.model, "model")].enqueue(sess.id, chunk, sess.state, change)

    async def advance(self, sess: Session, feeds: tuple[dict[str, np.ndarray], int]) -> Change:
        arrays, length = feeds
        _, graph = self.catalog.single(sess.model, "infer")
        outs, nxt = await self.compute.run(graph, arrays, sess.state, 1, length, True)
        steps0 = sess.steps
        result = StepResult(graph.split_outputs(outs, 1)[0], steps0, steps0 + length, False)
        return Change(nxt, steps0 + length, [], result, steps0)

    async def reset(self, sess: Session, _: None) -> Change:
        return Change(dict(sess.initial), 0, [], None, -1)


def with_batch(contract: Contract, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One sequence's outputs -> with a batch axis of 1, as a batched request is answered."""
    out = {}
    for spec in contract.outputs:
        arr = outputs[spec.name]
        out[spec.name] = arr if spec.batch_axis is None else np.expand_dims(arr, spec.batch_axis)
    return out
