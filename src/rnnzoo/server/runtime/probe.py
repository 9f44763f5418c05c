"""A contract checked against its graph by running it: once at batch 1, once at batch 2.

``_check_contract`` (model.py) compares names, dtypes, ranks and fixed dims with what the graph
declares. Symbolic dims say nothing about *where* the batch is, so a sidecar that declares a
batch-major state as ONNX's ``(layers, batch, hidden)`` passes those checks and would fail only
when two sessions are batched together. The probe feeds zeros (token id 0, the declared
constants, the declared initial context) shaped as the contract says, at two batch sizes, and
names each field whose declaration the graph contradicts. ``ServedModel`` runs it at load
(``rnnzoo serve``) and ``rnnzoo contract check`` prints what it finds.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rnnzoo.contract import Contract, StateSpec, TensorSpec

log = logging.getLogger(__name__)


def _steps(contract: Contract) -> int:
    """New steps per probe call: one chunk the contract allows (2 when any length goes)."""
    return contract.chunk.unit if contract.chunk is not None else 2


def _data(spec: TensorSpec, batch: int, steps: int) -> np.ndarray:
    shape = []
    for i, d in enumerate(spec.shape):
        if i == spec.batch_axis:
            shape.append(batch)
        elif i == spec.time_axis:
            shape.append(d if isinstance(d, int) else steps + spec.context_steps)
        else:
            shape.append(d if isinstance(d, int) else 1)
    return np.zeros(shape, dtype=spec.dtype)


def _state(st: StateSpec, batch: int) -> np.ndarray:
    shape = [batch if i == st.batch_axis else int(d) for i, d in enumerate(st.shape)]
    return np.zeros(shape, dtype=st.dtype)


def _graph_batch_axes(shape: Any) -> list[int]:
    return [i for i, d in enumerate(shape or []) if not isinstance(d, int)]


def probe(
    session: Any, contract: Contract, constants: dict[str, np.ndarray], *, must_run: bool = True
) -> list[str]:
    """Problems found running ``session`` (an ORT InferenceSession) as ``contract`` says,
    each naming the contract field to fix; [] when the graph behaves as declared.

    ``must_run=False`` (at load): a graph that fails already at batch 1 is not judged (it may
    need a length the contract does not declare; requests will say so), only one that runs
    at batch 1 and not at 2, or returns shapes the contract contradicts."""
    problems: list[str] = []
    g_in = {i.name: i.shape for i in session.get_inputs()}
    g_out = {o.name: o.shape for o in session.get_outputs()}
    for k, st in enumerate(contract.states):  # static: the batch axis on a fixed graph dim
        for name, shape in ((st.input, g_in.get(st.input)), (st.output, g_out.get(st.output))):
            if shape and st.batch_axis < len(shape) and isinstance(shape[st.batch_axis], int):
                free = _graph_batch_axes(shape)
                hint = f"; its symbolic dims are on axis {free}" if free else ""
                problems.append(
                    f"states[{k}].batch_axis: declared {st.batch_axis}, but the graph's "
                    f"{name!r} has the fixed size {shape[st.batch_axis]} there (shape "
                    f"{shape}){hint}"
                )
    if problems:
        return problems
    steps = _steps(contract)
    names = [s.name for s in contract.outputs] + [st.output for st in contract.states]
    for batch in (1, 2):
        feeds = {s.name: _data(s, batch, steps) for s in contract.inputs}
        feeds.update({st.input: _state(st, batch) for st in contract.states})
        feeds.update(constants)
        try:
            res = session.run(names, feeds)
        except Exception as exc:
            text = " ".join(str(exc).split())
            fed = ", ".join(f"{n} {list(a.shape)}" for n, a in feeds.items())
            if batch == 1 and not must_run:
                log.warning("%s: not probed, it fails on %s: %s", contract.name, fed, text)
                return []
            why = f"the graph fails at batch {batch} fed as the contract says ({fed}): {text}"
            if batch == 1:
                why += (
                    f"; {steps} new steps were fed: if the graph takes only some lengths, "
                    "declare chunk (steps or multiple_of); if each chunk needs the end of the "
                    "previous one, context_steps on that input"
                )
            if batch == 2 and contract.states:
                why += (
                    "; at batch 1 it ran, so a batch_axis is likely wrong (states[i]."
                    "batch_axis, inputs[i].batch_axis)"
                )
            problems.append(why)
            return problems
        got = dict(zip(names, res, strict=True))
        for k, st in enumerate(contract.states):
            out = got[st.output]
            want = _state(st, batch).shape
            if out.shape != want:
                problems.append(
                    f"states[{k}] ({st.input} -> {st.output}): at batch {batch} the graph "
                    f"returns {st.output!r} of shape {list(out.shape)}, not the {list(want)} fed "
                    f"as {st.input!r}: check states[{k}].shape and batch_axis"
                )
        for k, spec in enumerate(contract.outputs):
            out = got[spec.name]
            if out.ndim != len(spec.shape):
                problems.append(
                    f"outputs[{k}] ({spec.name}).shape: rank {len(spec.shape)} declared, the "
                    f"graph returns {list(out.shape)}"
                )
                continue
            if spec.batch_axis is not None and out.shape[spec.batch_axis] != batch:
                problems.append(
                    f"outputs[{k}] ({spec.name}).batch_axis: declared {spec.batch_axis}, but at "
                    f"batch {batch} the graph returns shape {list(out.shape)}"
                )
            drop = spec.drop_leading_steps
            if spec.time_axis is not None and drop and out.shape[spec.time_axis] <= drop:
                problems.append(
                    f"outputs[{k}] ({spec.name}).drop_leading_steps: {drop} would drop every "
                    f"step: the graph returns {out.shape[spec.time_axis]} steps for a chunk of "
                    f"{steps}"
                )
        if problems:
            return problems
    return problems
