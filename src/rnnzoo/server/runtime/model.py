"""One served ONNX graph: its contract checked against the ORT session, input validation,
state layout (gather/scatter on each state's batch axis) and one ``run`` per batch.

ORT session options are chosen for step serving (see /work/shared/REFERENCE.md): one intra-op
and one inter-op thread, sequential execution, and no spinning. A recurrent step is tens of
microseconds, so extra threads only add synchronisation; spinning threads burn the cores the
event loop and the other sessions need (2 spinning threads measured ~2x slower on 2 cores).
Throughput comes from batching sessions into one call instead.

Context windows (contract /2 ``context_steps``): the last K steps of such an input are part
of each sequence's state, under the key ``context:NAME`` beside the recurrent states, with the
input's own batch axis. So they are stacked and split by the batcher, reset with the session,
and snapshotted with the rest of its state. ``run`` prepends them to the new steps, keeps the
last K of the result as the next context, and drops each output's ``drop_leading_steps``. A
fixed chunk rule (``chunk.steps``) makes ``run`` cut a longer sequence into such chunks, the
state carried, so a whole-sequence Infer equals the same steps streamed.

Dtype policy for client inputs (documented, applied in ``validate_chunk``): float inputs accept
float16/float32/float64 and are cast to the contract dtype (float64 -> float32 loses only
precision the model cannot use); integer inputs accept any integer dtype whose values fit;
everything else (floats for token ids, ints for features, bool, strings) is InvalidArgument.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort

from rnnzoo.contract import Contract, StateSpec, TensorSpec
from rnnzoo.errors import InvalidArgument
from rnnzoo.ort_options import run_fn, session_options

from . import telemetry
from .probe import probe
from .redact import clip

ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


CONTEXT_PREFIX = "context:"  # a context window's key among a sequence's states
MAX_ERROR_CHARS = 4000  # an ORT error longer than this is cut at a word boundary


def context_key(name: str) -> str:
    return CONTEXT_PREFIX + name


def _free_axis(spec: TensorSpec) -> int | None:
    """The time axis of the batch-free view of ``spec`` (batch axis removed)."""
    t, b = spec.time_axis, spec.batch_axis
    if t is None:
        return None
    return t - 1 if b is not None and b < t else t


@dataclass(slots=True)
class Chunk:
    """A validated batch-free chunk of one sequence: arrays in contract dtypes, its length."""

    arrays: dict[str, np.ndarray]
    length: int  # time steps (1 when no input has a time axis)


@dataclass(frozen=True)
class _InputPlan:
    """One input's checks for a batch-free chunk, derived once from its TensorSpec."""

    spec: TensorSpec
    name: str
    dtype: np.dtype
    free: list[int | str]  # expected batch-free shape (ints, or symbols for batch/time-like dims)
    fixed: tuple[tuple[int, int], ...]  # (axis, size) pairs that must match exactly
    time: int | None  # time axis of the batch-free view

    @classmethod
    def of(cls, spec: TensorSpec) -> _InputPlan:
        free = [d for i, d in enumerate(spec.shape) if i != spec.batch_axis]
        fixed = tuple((i, d) for i, d in enumerate(free) if isinstance(d, int))
        return cls(spec, spec.name, np.dtype(spec.dtype), free, fixed, _free_axis(spec))


class ServedModel:
    """A checked ONNX graph. ``run`` is thread-safe (ORT sessions are)."""

    def __init__(
        self,
        path: Path,
        contract: Contract,
        intra: int = 1,
        inter: int = 1,
        probe_graph: bool = True,
        must_run: bool = False,
    ) -> None:
        """``probe_graph``: run the graph at batch 1 and 2 as the contract says (probe.py);
        ``must_run``: a graph that fails at batch 1 is an error too (``contract check``)."""
        self.must_run = must_run
        self.executions = 0  # successful ORT calls (KServe ModelStatistics' execution_count)
        self.path = Path(path)
        self.contract = contract
        try:
            options = session_options(intra, inter)
            # No CPU memory arena: ORT's arena keeps the peak of every large call for the
            # process's life (four concurrent 15 MB-output Infers left ~150 MB in it);
            # without it, freed buffers go back to malloc, and malloc_trim returns them to
            # the OS (docs/reliability.md). Step latency measured the same either way.
            options.enable_cpu_mem_arena = False
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph classes
            raise InvalidArgument(
                f"{self.path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc}); "
                "re-export the model or remove it from the model directory"
            ) from None
        self._ort_run = run_fn(self.session)  # the direct call (see run_fn: ~14 µs a call)
        self._check_contract()
        self.constants = {c.name: np.asarray(c.value, dtype=c.dtype) for c in contract.constants}
        # context windows: (input spec, state key, K) for each input with context_steps
        self._ctx = [
            (s, context_key(s.name), s.context_steps) for s in contract.inputs if s.context_steps
        ]
        # every per-sequence state array, recurrent and context: (key, batch axis)
        self._slots = [(st.input, st.batch_axis) for st in contract.states]
        self._slots += [
            (key, cast(int, s.batch_axis)) for s, key, _ in self._ctx
        ]  # context input: batch, time axes assumed
        self.init_states = {st.input: self._init_state(st) for st in contract.states}
        for spec, key, _ in self._ctx:
            self.init_states[key] = self._init_context(spec)
        self.chunk = contract.chunk
        self._drop = [
            (s.name, cast(int, s.time_axis), s.drop_leading_steps)  # dropping needs a time axis
            for s in contract.outputs
            if s.drop_leading_steps
        ]
        if probe_graph:
            self._probe()
        # A decoder reads its own outputs back: its input ids are target-vocabulary ids.
        vocab = contract.target_vocab if contract.role == "decoder" else contract.vocab
        self.vocab_size = len(vocab) if vocab else None
        # what ``run`` asks ORT for, fixed per graph
        self._fetch = [s.name for s in contract.outputs] + [st.output for st in contract.states]
        self._out_names = [s.name for s in contract.outputs]  # the fetch's first part
        self._state_keys = [st.input for st in contract.states]  # next states' keys, in order
        # Per-message validation reads these instead of re-deriving them from the contract.
        self._plans = [_InputPlan.of(spec) for spec in contract.inputs]
        self._input_names = frozenset(p.name for p in self._plans)
        # Output bytes per (sequence, step), per sequence, per step and fixed, from the
        # contract: what a call will return is known before it runs (``output_bytes``).
        self._out_bytes = [0, 0, 0, 0]
        for spec in contract.outputs:
            per = np.dtype(spec.dtype).itemsize
            for d in spec.feature_shape():
                per *= d if isinstance(d, int) else 1  # other symbolic dims: counted as 1
            kind = (spec.batch_axis is None) * 2 + (spec.time_axis is None)
            self._out_bytes[kind] += per

    # ---- contract vs graph -------------------------------------------------------------
    def _check_contract(self) -> None:
        c, where = self.contract, f"{self.path}"
        fix = "fix the contract (sidecar or metadata) or re-export the model"
        g_in = {i.name: i for i in self.session.get_inputs()}
        g_out = {o.name: o for o in self.session.get_outputs()}
        problems: list[str] = []

        def check(
            kind: str, name: str, dtype: str, rank: int | None, shape: Any, graph: dict[str, Any]
        ) -> None:
            node = graph.get(name)
            if node is None:
                problems.append(f"{kind} {name!r} is not in the graph (graph has {sorted(graph)})")
                return
            gdt = ORT_DTYPES.get(node.type, node.type)
            if gdt != dtype:
                problems.append(f"{kind} {name!r}: contract dtype {dtype}, graph {gdt}")
            if rank is not None and node.shape is not None and len(node.shape) != rank:
                problems.append(
                    f"{kind} {name!r}: contract rank {rank} {list(shape)}, graph rank "
                    f"{len(node.shape)} {node.shape}"
                )
            elif shape is not None and node.shape is not None:
                for i, (a, g) in enumerate(zip(shape, node.shape, strict=False)):
                    if isinstance(a, int) and isinstance(g, int) and a != g:
                        problems.append(
                            f"{kind} {name!r}: dim {i} is {a} in the contract, {g} in the graph"
                        )

        for s in c.inputs:
            check("input", s.name, s.dtype, len(s.shape), s.shape, g_in)
        for s in c.outputs:
            check("output", s.name, s.dtype, len(s.shape), s.shape, g_out)
        for st in c.states:
            check("state input", st.input, st.dtype, len(st.shape), st.shape, g_in)
            check("state output", st.output, st.dtype, len(st.shape), st.shape, g_out)
        for k in c.constants:
            check("constant", k.name, k.dtype, np.ndim(k.value), None, g_in)
        declared = {s.name for s in c.inputs} | {st.input for st in c.states}
        declared |= {k.name for k in c.constants}
        for name in sorted(set(g_in) - declared):
            problems.append(
                f"graph input {name!r} is not declared: add it to inputs, states or constants"
            )
        if problems:
            raise InvalidArgument(
                f"{where}: contract does not match the graph; {fix}:\n  - "
                + "\n  - ".join(problems)
            )

    def _probe(self) -> None:
        """Run the graph at batch 1 and 2 as the contract says (probe.py): a wrong batch axis
        fails the load naming the field, not the first batched request."""
        problems = probe(self.session, self.contract, self.constants, must_run=self.must_run)
        if problems:
            raise InvalidArgument(
                f"{self.path}: the graph does not behave as its contract says (run at batch 1 "
                "and 2); fix the contract (sidecar or metadata), `rnnzoo contract check` "
                "shows the same:\n  - " + "\n  - ".join(problems)
            )

    def _init_state(self, st: StateSpec) -> np.ndarray:
        """One sequence's initial state, with a batch axis of size 1."""
        shape = self.contract.state_feature_shape(st)
        if st.init == "zeros":
            v = np.zeros(shape, dtype=st.dtype)
        else:
            v = np.asarray(st.init_value, dtype=st.dtype)
            if list(v.shape) != shape:
                raise InvalidArgument(
                    f"{self.path}: state {st.input!r} init_value has shape {list(v.shape)}, "
                    f"expected {shape} (the state shape without its batch axis)"
                )
        return np.expand_dims(v, st.batch_axis)

    def _init_context(self, spec: TensorSpec) -> np.ndarray:
        """One sequence's initial context window (K steps), with a batch axis of size 1."""
        shape: list[Any] = [1 if i == spec.batch_axis else d for i, d in enumerate(spec.shape)]
        shape[cast(int, spec.time_axis)] = (
            spec.context_steps
        )  # context input: batch, time axes assumed
        free = [d for i, d in enumerate(shape) if i != spec.batch_axis]
        if spec.initial_context is None:
            return np.zeros(shape, dtype=spec.dtype)
        v = np.asarray(spec.initial_context, dtype=spec.dtype)
        if list(v.shape) != free:
            raise InvalidArgument(
                f"{self.path}: input {spec.name!r} initial_context has shape {list(v.shape)}, "
                f"expected {free} (context_steps={spec.context_steps} steps of one sequence, "
                "no batch axis)"
            )
        return np.expand_dims(v, cast(int, spec.batch_axis))

    # ---- validation -----------------------------------------------------------------------
    def _coerce(self, spec_name: str, dtype: str | np.dtype, arr: Any) -> np.ndarray:
        a = arr if type(arr) is np.ndarray else np.asarray(arr)
        want = np.dtype(dtype)
        if a.dtype == want:
            out = a
        elif want.kind == "f" and a.dtype.kind == "f":
            out = a.astype(want)
        elif want.kind == "i" and a.dtype.kind in "iu":
            info = np.iinfo(want)
            if a.size and (a.min() < info.min or a.max() > info.max):
                raise InvalidArgument(f"input {spec_name!r}: values do not fit {dtype}")
            out = a.astype(want)
        else:
            raise InvalidArgument(
                f"input {spec_name!r}: expected dtype {want}, got {a.dtype}; send {want} "
                "(floats accept float16/32/64, integers any integer type)"
            )
        # One BLAS dot instead of isfinite().all(): a finite sum of squares means every
        # value is finite; only a non-finite one (NaN/inf inside, or squares that overflowed
        # the dtype) needs the exact element-wise check. 1.5 µs on a one-step chunk, vs 3.2
        # for a float64 add.reduce and 3.4 for isfinite().all() (2-core AMD EPYC).
        if want.kind == "f" and not math.isfinite(np.vdot(out, out)) and not np.isfinite(out).all():
            raise InvalidArgument(f"input {spec_name!r}: contains NaN or infinity")
        return out

    def _check_names(self, inputs: dict[str, Any]) -> None:
        want = [s.name for s in self.contract.inputs]
        unknown = sorted(set(inputs) - set(want))
        missing = [n for n in want if n not in inputs]
        if len(unknown) > 8:
            unknown = [*unknown[:8], f"... {len(unknown) - 8} more"]
        unknown = [clip(n) for n in unknown]
        if unknown or missing:
            raise InvalidArgument(
                f"model {self.contract.name!r} takes inputs {want}; "
                f"missing {missing}, unknown {unknown}"
            )

    def _check_values(self, spec: TensorSpec, a: np.ndarray) -> None:
        if self.vocab_size and a.dtype.kind == "i" and a.size:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= self.vocab_size:
                raise InvalidArgument(
                    f"input {spec.name!r}: token ids must be in [0, {self.vocab_size}), "
                    f"got values in [{lo}, {hi}]"
                )

    def validate_chunk(self, inputs: dict[str, Any]) -> Chunk:
        """Batch-free chunk of one sequence, e.g. {"x": (T, F)} -> checked arrays.

        Runs once per streamed message, so it reads the precomputed ``_InputPlan``s and
        keeps the slow, descriptive paths for the error cases.
        """
        if inputs.keys() != self._input_names:
            self._check_names(inputs)
        out, length = {}, None
        for p in self._plans:
            a = self._coerce(p.name, p.dtype, inputs[p.name])
            shape = a.shape
            if len(shape) != len(p.free) or any(shape[i] != w for i, w in p.fixed):
                self._check_shape(p.name, shape, p.free, p.time)
            if p.time is not None:
                n = shape[p.time]
                if n == 0:
                    raise InvalidArgument(f"input {p.name!r}: empty chunk (0 time steps)")
                if length is not None and n != length:
                    raise InvalidArgument(
                        f"inputs disagree on the number of time steps: {length} vs "
                        f"{n} for {p.name!r}"
                    )
                length = n
            if self.vocab_size:
                self._check_values(p.spec, a)
            out[p.name] = a
        if self.chunk is not None and length is not None:
            self.check_chunk(length, stream=True)
        return Chunk(out, length or 1)

    def check_chunk(self, length: int, *, stream: bool) -> None:
        """The contract's chunk rule, in new steps: a streamed chunk must follow it; a whole
        sequence (Infer) must be a whole number of fixed chunks (``run`` cuts it)."""
        rule = self.chunk
        if rule is None:
            return
        unit = rule.unit
        if stream and rule.steps and length != rule.steps:
            raise InvalidArgument(
                f"model {self.contract.name!r} takes {rule.describe()}; this chunk has "
                f"{length} steps"
            )
        if length % unit:
            what = "this chunk" if stream else "this sequence"
            how = (
                f"send a whole number of {unit}-step chunks (run one after the other, state "
                "carried)"
                if rule.steps
                else f"send a multiple of {unit} steps"
            )
            raise InvalidArgument(
                f"model {self.contract.name!r} takes {rule.describe()}; {what} has {length} "
                f"steps: {how}"
            )

    def validate_batch(self, inputs: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        """Whole-sequence inputs WITH the batch axis -> (arrays, batch size)."""
        self._check_names(inputs)
        out, batch = {}, None
        for spec in self.contract.inputs:
            a = self._coerce(spec.name, spec.dtype, inputs[spec.name])
            self._check_shape(spec.name, a.shape, list(spec.shape), spec.time_axis)
            if spec.time_axis is not None and a.shape[spec.time_axis] == 0:
                raise InvalidArgument(f"input {spec.name!r}: empty sequence (0 time steps)")
            if spec.batch_axis is not None:
                n = a.shape[spec.batch_axis]
                if n == 0 or (batch is not None and n != batch):
                    raise InvalidArgument(
                        f"input {spec.name!r}: batch size {n}; every input needs the same "
                        "batch size >= 1"
                    )
                batch = n
            self._check_values(spec, a)
            out[spec.name] = a
        if self.chunk is not None:
            self.check_chunk(self.feed_steps(self.contract, out), stream=False)
        return out, batch or 1

    @staticmethod
    def _check_shape(
        name: str, got: tuple[int, ...], want: list[int | str], time_axis: int | None
    ) -> None:
        if len(got) != len(want):
            raise InvalidArgument(
                f"input {name!r}: expected rank {len(want)} shape {want}, got shape {list(got)}"
            )
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if isinstance(w, int) and g != w:
                raise InvalidArgument(
                    f"input {name!r}: dim {i} must be {w} (expected shape {want}), got "
                    f"shape {list(got)}"
                )

    def validate_state(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        """A client-given state of ONE sequence (batch-free) -> batch-1 arrays. Keys: state
        input names, and ``context:NAME`` for a context window (a snapshot carries both);
        what is not given starts from its initial value."""
        want = {st.input: (st.dtype, st.batch_axis) for st in self.contract.states}
        for spec, key, _ in self._ctx:
            want[key] = (
                spec.dtype,
                cast(int, spec.batch_axis),
            )  # context input: batch, time axes assumed
        unknown = [clip(n) for n in sorted(set(state) - set(want))[:8]]
        if unknown:
            raise InvalidArgument(
                f"initial state names {unknown} unknown; model {self.contract.name!r} has "
                f"states {sorted(want)}"
            )
        out = dict(self.init_states)
        for name, arr in state.items():
            dtype, axis = want[name]
            a = self._coerce(name, dtype, arr)
            shape = list(np.take(self.init_states[name], 0, axis=axis).shape)
            if list(a.shape) != shape:
                raise InvalidArgument(
                    f"initial state {name!r}: expected shape {shape} (one sequence, no batch "
                    f"axis), got {list(a.shape)}"
                )
            out[name] = np.expand_dims(a, axis)
        return out

    @property
    def slots(self) -> list[tuple[str, int]]:
        """Every per-sequence state array, recurrent and context window: (key, batch axis)."""
        return list(self._slots)

    def unbatch_state(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A session's batch-1 states -> one sequence's, without the batch axis (the inverse
        of ``validate_state``); context windows included."""
        return {key: np.take(state[key], 0, axis=ax) for key, ax in self._slots}

    def output_bytes(self, batch: int, steps: int) -> int:
        """Bytes of data outputs one call on ``batch`` sequences of ``steps`` steps returns
        (Python ints: no overflow, nothing allocated)."""
        per_both, per_seq, per_step, fixed = self._out_bytes
        return batch * steps * per_both + batch * per_seq + steps * per_step + fixed

    @staticmethod
    def feed_steps(contract: Contract, feeds: dict[str, np.ndarray]) -> int:
        """Time steps of a batched feed (1 when no input has a time axis)."""
        for spec in contract.inputs:
            if spec.time_axis is not None:
                return int(feeds[spec.name].shape[spec.time_axis])
        return 1

    # ---- batching and running ---------------------------------------------------------------
    def stack_chunks(self, chunks: list[Chunk]) -> dict[str, np.ndarray]:
        """Equal-length batch-free chunks -> one batched feed."""
        feeds = {}
        for spec in self.contract.inputs:
            arrs = [c.arrays[spec.name] for c in chunks]
            if spec.batch_axis is None:
                feeds[spec.name] = arrs[0]
            elif len(arrs) == 1:  # a batch of one: a view with a new axis, no copy
                feeds[spec.name] = arrs[0][(slice(None),) * spec.batch_axis + (None,)]
            elif spec.batch_axis == 0:  # np.array stacks equal shapes in C: 10 against 24 µs
                feeds[spec.name] = np.array(arrs)  # for 64 one-step chunks (np.stack's checks)
            else:
                feeds[spec.name] = np.stack(arrs, axis=spec.batch_axis)
        return feeds

    def concat_chunks(self, chunks: list[Chunk]) -> Chunk:
        """Consecutive chunks of one sequence -> one chunk (the prefix so far)."""
        assert chunks
        arrays = {}
        for spec in self.contract.inputs:
            t = _free_axis(spec)
            arrs = [c.arrays[spec.name] for c in chunks]
            arrays[spec.name] = arrs[-1] if t is None else np.concatenate(arrs, axis=t)
        return Chunk(arrays, sum(c.length for c in chunks))

    def stack_states(self, states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Per-sequence batch-1 states (recurrent and context) -> one batch."""
        if len(states) == 1:  # already batch-1 arrays; ORT never writes its inputs
            return {key: states[0][key] for key, _ in self._slots}
        return {key: np.concatenate([s[key] for s in states], axis=ax) for key, ax in self._slots}

    def split_outputs(self, outputs: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
        """Batched outputs -> per-sequence batch-free outputs (views)."""
        res: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
        for spec in self.contract.outputs:
            a = outputs[spec.name]
            if spec.batch_axis is None:
                for r in res:
                    r[spec.name] = a
                continue
            front = a if spec.batch_axis == 0 else np.moveaxis(a, spec.batch_axis, 0)
            for r, row in zip(res, front, strict=True):  # iterating the front axis: in C
                r[spec.name] = row
        return res

    def split_states(self, states: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
        """Batched next states (keyed by state INPUT name) -> per-sequence batch-1 arrays:
        views, each with its batch axis kept (size 1)."""
        res: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
        for key, ax in self._slots:
            for r, row in zip(res, batch_rows(states[key], ax), strict=True):
                r[key] = row
        return res

    def initial_batch_state(self, n: int) -> dict[str, np.ndarray]:
        return self.stack_states([self.init_states] * n)

    def run(
        self, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One batch of new steps. Returns (data outputs, next states keyed by state input,
        and context windows by ``context:NAME``). A fixed chunk rule: a longer sequence runs
        as consecutive chunks, the state carried (outputs without a time axis: the last's)."""
        rule = self.chunk
        steps = self.feed_steps(self.contract, inputs) if rule and rule.steps else 0
        if not rule or not rule.steps or steps <= rule.steps:
            return self._run_once(inputs, states)
        parts = []
        for a in range(0, steps, rule.steps):
            part = {}
            for spec in self.contract.inputs:
                arr = inputs[spec.name]
                if spec.time_axis is not None:
                    idx = [slice(None)] * arr.ndim
                    idx[spec.time_axis] = slice(a, a + rule.steps)
                    arr = arr[tuple(idx)]
                part[spec.name] = arr
            outs, states = self._run_once(part, states)
            parts.append(outs)
        return {
            spec.name: parts[-1][spec.name]
            if spec.time_axis is None
            else np.concatenate([p[spec.name] for p in parts], spec.time_axis)
            for spec in self.contract.outputs
        }, states

    def _run_once(
        self, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        feeds = {**inputs, **self.constants}
        nxt_ctx = {}
        for spec, key, k in self._ctx:  # context windows: prepend, keep the last K
            full = np.concatenate([states[key], inputs[spec.name]], axis=spec.time_axis)
            feeds[spec.name] = full
            idx = [slice(None)] * full.ndim
            t_ax = cast(int, spec.time_axis)  # context input: batch, time axes assumed
            idx[t_ax] = slice(full.shape[t_ax] - k, None)
            nxt_ctx[key] = np.ascontiguousarray(full[tuple(idx)])
        for st in self.contract.states:
            feeds[st.input] = states[st.input]
        t0 = time.perf_counter()
        try:
            res = self._ort_run(self._fetch, feeds)
        except Exception as exc:  # ORT's own error classes
            raise InvalidArgument(self.describe_failure(exc, feeds)) from None
        telemetry.ort_run(self.contract.name, time.perf_counter() - t0)
        self.executions += 1
        outs = dict(zip(self._out_names, res, strict=False))  # res: outputs, then states
        for name, axis, drop in self._drop:
            a = outs[name]
            idx = [slice(None)] * a.ndim
            idx[axis] = slice(drop, None)
            outs[name] = a[tuple(idx)]
        nxt = dict(zip(self._state_keys, res[len(self._out_names) :], strict=True))
        if nxt_ctx:
            nxt.update(nxt_ctx)
        return outs, nxt

    def describe_failure(self, exc: BaseException, feeds: dict[str, np.ndarray]) -> str:
        """ORT's error text, whole (cut only past MAX_ERROR_CHARS, at a word boundary), and
        the feeds: their shapes, context steps, and each fixed graph dim a feed breaks."""
        text = " ".join(str(exc).split())
        if len(text) > MAX_ERROR_CHARS:
            text = text[:MAX_ERROR_CHARS].rsplit(" ", 1)[0] + " [...]"
        graph = {i.name: i.shape for i in self.session.get_inputs()}
        ctx = {spec.name: k for spec, _, k in self._ctx}
        fed, wrong = [], []
        for name, a in feeds.items():
            note = f" ({ctx[name]} context steps + new)" if name in ctx else ""
            fed.append(f"{name} {a.dtype}{list(a.shape)}{note}")
            want = graph.get(name)
            if want is None:
                continue
            if len(want) != a.ndim:
                wrong.append(f"input {name!r} has rank {a.ndim}, the graph wants {want}")
                continue
            for i, (g, w) in enumerate(zip(a.shape, want, strict=True)):
                if isinstance(w, int) and g != w:
                    wrong.append(f"input {name!r} dim {i} is {g}, the graph wants {w} ({want})")
        msg = f"model {self.contract.name!r} failed on this input ({type(exc).__name__}: {text})"
        if wrong:
            msg += "; " + "; ".join(wrong)
        return msg + "; fed " + ", ".join(fed) + "; the session state is unchanged"


def batch_rows(a: np.ndarray, axis: int) -> list[np.ndarray]:
    """``a``'s rows along its batch ``axis``, each keeping that axis with size 1: the views
    ``a[:, i:i+1]`` (for ``axis=1``). From 16 rows on they are made by moving a new size-1
    axis behind the batch axis and the batch axis to the front, and iterating that in C: 64
    rows of a (2, 64, 128) state took 23 µs as one index tuple per row, and take 11 µs so;
    below 16 rows the index tuples are cheaper (the moves cost ~6 µs whatever the size)."""
    n = a.shape[axis]
    if n < 16:
        head = (slice(None),) * axis
        return [a[(*head, slice(i, i + 1))] for i in range(n)]
    return list(np.moveaxis(np.expand_dims(a, axis + 1), axis, 0))
