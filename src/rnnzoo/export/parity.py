"""Parity: ONNX Runtime against PyTorch, by a rule that holds on every machine.

The rule works on any graph with the flat signature ``(*inputs, *states) -> (*outputs,
*states)`` and its contract: the zoo's ``RecurrentNet`` graphs and any user module alike.
All cases are collected before the verdict (like optimum's validation):

- **per-step** (``step1``, ``step8``; streamable graphs): both runtimes advance 1 and 8 steps
  from the *same* state, taken along PyTorch's reference trajectory at every T of the grid
  (and at T=0 from the random initial state). Errors cannot pile up over 8 steps, so these,
  and whole sequences of T <= ``FIXED_T`` = 8, are judged at the fixed tolerance
  ``atol + rtol * |torch|`` on every machine. They are what catches a wrong export.
- **sequences** (T > 8; whole, and chunked with the state carried between ORT calls in
  chunks of 1, 7 and random sizes, at T = 64 and 1000): two correct float32 implementations
  differ at each step by a few units of roundoff, and the net carries those local
  differences forward, damped or amplified. How much is measured in float64, never from the
  host's float32 results: a float64 walk along the same trajectory perturbs the state by
  ``PERTURBATION`` every ``KICK_EVERY`` steps (in the direction that grew most, renormalised,
  as in Benettin's method for Lyapunov exponents) and measures the growth. From it comes the
  conditioning ``kappa(T)``: how many steps' worth of local error can be standing in a tensor
  by T. The tolerance is ``atol + rtol * |torch| + LOCAL_ULPS * u * kappa(T) * max(1, |torch|)``
  with ``u = 2**-24``, and the report lists kappa for every case. A net that forgets keeps
  kappa at a couple of chunks (~17); one that integrates its input (the adding-problem GRU)
  has kappa ~ T; a chaotic one (a tanh RNN with recurrent gain 3; the num2words encoder on
  random digits) has a huge kappa, and its cases say float32 cannot resolve them instead of
  pretending it can. Such nets are judged by their per-step cases.

Why not a flat tolerance or a float64 fallback: a whole-trajectory comparison of a chaotic or
integrating net depends on the host's float kernels (the trained num2words encoder drifted
2.5e-5 from float64 at T=1000 on an AMD EPYC host and passed on an Intel Xeon one, and a
correct export of a gain-3 tanh RNN differed by 2.8e-4 at T=64 here), while the one-step
error from the same state stayed <= 2.4e-6 on every zoo model up to T=10,000.

Bidirectional (non-streamable) graphs have no step-by-step trajectory: they are judged on
whole sequences only, T <= 8 at the fixed tolerance and longer ones by a conditioning taken
from one perturbation of the initial state. Every tensor must be judged by at least one
fixed-tolerance case for the report to pass. An ORT failure (e.g. a graph whose time axis was
fixed to the example length) is a failing case with its error text, not a crash.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnnzoo.contract import Contract
from rnnzoo.errors import InvalidArgument

TIMES = (1, 2, 7, 64, 1000, 10000)
BATCHES = (1, 3, 32)
STEPS = (1, 8)  # per-step cases advance this many steps from a trajectory state
# Whole and chunked cases up to this length are judged at the fixed tolerance, like the
# per-step ones; longer ones by their measured conditioning (see the module docstring).
FIXED_T = 8
STREAM_T, STREAM_B = 1000, 3  # the longest chunked comparison
CHUNKED_SHORT_T = 64  # chunked cases also run at this length
ATOL = 1e-5
# The small relative term is for LSTM cell states, which are not bounded: a trained 2-layer
# LSTM's cn reached |31| at T=64, where one float32 ulp is 1.9e-6 (8 ulp measured between the
# runtimes) while every bounded tensor stayed under 5e-6.
RTOL = 1e-6
U = 2.0**-24  # float32 unit roundoff
# Local difference per step allowed between two correct float32 implementations, in units of
# u x max(1, |value|): dot products of a few hundred terms summed in another order and
# transcendental functions a few ulp apart. The largest one-step difference measured on the
# zoo was 2.4e-6 ~ 40 u; 64 u leaves room without letting a wrong export (errors >= 1e-3)
# through the fixed-tolerance cases, which this constant does not touch.
LOCAL_ULPS = 64
PERTURBATION = 1e-7  # float64 state perturbation, well inside the linear regime
KICK_EVERY = 8  # the float64 walk re-perturbs the state this often (steps)
COND_ROWS = 4  # conditioning is measured on the first rows of each case's batch
# A long case whose tolerance (at unit scale) reaches this cannot tell a right export from a
# wrong one; it still runs and is reported, marked ill-conditioned.
RESOLVED_TOL = 1e-2
MAX_BYTES = 8 << 30  # per case, both runtimes together (a deliberately high estimate)

# (B, T, generator) -> (data inputs in contract order, initial states in contract order)
Sample = Callable[[int, int, torch.Generator], tuple[list[torch.Tensor], list[torch.Tensor]]]


@dataclass
class Case:
    graph: str  # the contract name
    mode: str  # "whole", "stream/<chunking>", "step<k>"
    batch: int
    time: int  # sequence length; for step<k>, the trajectory position the steps start from
    tensor: str  # output or state name
    max_abs: float
    margin: float  # max over elements of |ort - torch| / tolerance (<= 1 passes)
    ok: bool
    tol: float  # the absolute part of the tolerance (atol + conditioning term)
    kappa: float | None = None  # the conditioning that set ``tol``; None: fixed tolerance
    error: str | None = None  # ONNX Runtime failed, or shapes differ

    @property
    def fixed(self) -> bool:
        """Judged at the fixed tolerance (per-step and short cases)."""
        return self.kappa is None


@dataclass
class Report:
    cases: list[Case] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # One row per (graph, T) of the cases longer than FIXED_T: the measured conditioning.
    conditioning: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[Case]:
        return [c for c in self.cases if not c.ok]

    @property
    def unjudged(self) -> list[str]:
        """``graph/tensor`` names that no fixed-tolerance case compared."""
        tensors = {(c.graph, c.tensor) for c in self.cases}
        fixed = {(c.graph, c.tensor) for c in self.cases if c.fixed}
        return sorted(f"{g}/{t}" for g, t in tensors - fixed)

    @property
    def ok(self) -> bool:
        return bool(self.cases) and not self.failures and not self.unjudged

    def max_abs(self, mode_prefix: str = "", *, fixed_only: bool = False) -> float | None:
        """Worst abs error over the cases whose mode starts with ``mode_prefix`` (None: none);
        ``fixed_only``: over the fixed-tolerance cases alone (what float32 always resolves)."""
        vals = [
            c.max_abs
            for c in self.cases
            if c.mode.startswith(mode_prefix) and (c.fixed or not fixed_only)
        ]
        return max(vals) if vals else None

    def headline(self) -> str:
        """One line for progress output: cases, worst error where it is resolved, max kappa."""
        fixed, kappa = self.max_abs(fixed_only=True), self.max_kappa()
        parts = [f"{len(self.cases)} cases"]
        if fixed is not None:
            parts.append(f"worst {fixed:.1e} at the fixed tolerance")
        if kappa is not None:
            parts.append(f"max kappa {kappa:.2g}")
        return ", ".join(parts)

    def worst(self) -> dict[str, float]:
        """Max abs error per tensor over every case (``graph/tensor`` when several graphs)."""
        several = len({c.graph for c in self.cases}) > 1
        out: dict[str, float] = {}
        for c in self.cases:
            key = f"{c.graph}/{c.tensor}" if several else c.tensor
            out[key] = max(out.get(key, 0.0), c.max_abs)
        return out

    def max_kappa(self) -> float | None:
        vals = [row["kappa"] for row in self.conditioning]
        return max(vals) if vals else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["failures"] = [asdict(c) for c in self.failures]
        d["unjudged"] = self.unjudged
        d["max_abs_by_tensor"] = self.worst()
        return d

    def summary(self) -> str:
        lines = [
            f"{len(self.cases)} comparisons, {len(self.failures)} failing, "
            f"{self.seconds:.1f}s; max abs error per tensor: "
            + ", ".join(f"{k}={v:.2e}" for k, v in self.worst().items())
        ]
        for row in self.conditioning:
            verdict = "" if row["resolved"] else " (ill-conditioned: float32 cannot resolve it)"
            lines.append(
                f"conditioning {row['graph']} T={row['time']}: "
                f"kappa {row['kappa']:.3g}, tolerance {row['tol']:.2e}{verdict}"
            )
        lines += [f"skipped: {s}" for s in self.skipped]
        lines += [f"note: {s}" for s in self.notes]
        lines += [f"FAIL {u}: no fixed-tolerance case compared it" for u in self.unjudged]
        for c in self.failures:
            what = c.error or f"max abs {c.max_abs:.3e} > tolerance {c.tol:.2e}"
            lines.append(f"FAIL {c.graph} {c.mode} B={c.batch} T={c.time} {c.tensor}: {what}")
        return "\n".join(lines)


def report_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=True, default=float)


def make_session(path: str | Path):
    """An ORT CPU session configured as the server runs it (one thread, no spinning)."""
    import onnxruntime as ort

    from rnnzoo.ort_options import session_options

    try:
        return ort.InferenceSession(
            str(path), session_options(1, 1), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph classes
        raise InvalidArgument(
            f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc}); "
            "re-export it with `rnnzoo export`"
        ) from None


def compare(ort_out: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> tuple[float, float]:
    """(max abs diff, max diff / (atol + rtol * |ref|)). Non-finite values match only alike."""
    if ort_out.shape != ref.shape:
        return float("inf"), float("inf")
    diff = np.abs(ort_out.astype(np.float64) - ref.astype(np.float64))
    both_nan = np.isnan(ort_out) & np.isnan(ref)
    same_inf = np.isinf(ref) & (ort_out == ref)
    diff = np.nan_to_num(np.where(both_nan | same_inf, 0.0, diff), nan=np.inf)
    scale = np.abs(np.nan_to_num(ref.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    if not diff.size:
        return 0.0, 0.0
    return float(diff.max()), float((diff / (atol + rtol * scale)).max())


# ---- running both sides -------------------------------------------------------------------


def _narrow(t: torch.Tensor, axis: int | None, start: int, stop: int) -> torch.Tensor:
    return t if axis is None else t.narrow(axis, start, stop - start)


def _join(parts: list[np.ndarray], axis: int | None) -> np.ndarray:
    """Per-chunk outputs along their time axis; an output without one: the last chunk's."""
    return parts[-1] if axis is None else np.concatenate(parts, axis=axis)


class _Sides:
    """Runs the eager module and the ORT session on the same chunk, in contract order."""

    def __init__(self, flat: nn.Module, sess: Any, contract: Contract) -> None:
        self.flat = flat.eval()
        self.sess = sess
        self.c = contract
        self.in_axes = [t.time_axis for t in contract.inputs]
        self.out_axes = [t.time_axis for t in contract.outputs]
        lengths = contract.extra.get("lengths") or {}
        self.lengths = {
            i: lengths[t.name] for i, t in enumerate(contract.inputs) if t.name in lengths
        }
        self.in_names = [t.name for t in contract.inputs] + [s.input for s in contract.states]
        self.out_names = [t.name for t in contract.outputs] + [s.output for s in contract.states]
        self.n_out = len(contract.outputs)
        self._flat64: nn.Module | None = None

    @property
    def flat64(self) -> nn.Module:
        """The same module in float64: the reference for conditioning (built on first need)."""
        if self._flat64 is None:
            self._flat64 = copy.deepcopy(self.flat).double().eval()
        return self._flat64

    def chunk(self, xs: list[torch.Tensor], a: int, b: int) -> list[torch.Tensor]:
        out = [_narrow(x, ax, a, b) for x, ax in zip(xs, self.in_axes, strict=True)]
        if not self.lengths:
            return out
        # lengths of packed sequences cannot exceed the steps kept (the longest fills them);
        # relative ones (fractions of the time axis) are rescaled to the steps kept
        full = next(x.shape[ax] for x, ax in zip(xs, self.in_axes, strict=True) if ax is not None)
        for i, kind in self.lengths.items():
            x = out[i]
            if kind == "steps":
                out[i] = x.clamp(max=b - a)
            else:
                out[i] = (torch.round(x * full).clamp(1, b - a) / (b - a)).to(x.dtype)
        return out

    def torch(self, xs, states, module: nn.Module | None = None) -> list[torch.Tensor]:
        with torch.no_grad():
            out = (module or self.flat)(*xs, *states)
        out = list(out) if isinstance(out, tuple | list) else [out]
        assert len(out) == len(self.out_names), (len(out), self.out_names)
        return out

    def ort(self, xs, states) -> tuple[list[np.ndarray] | None, str | None]:
        feeds = {
            n: np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t)
            for n, t in zip(self.in_names, [*xs, *states], strict=True)
        }
        try:
            return self.sess.run(self.out_names, feeds), None
        except Exception as exc:  # ORT's own error classes: a failing case, with its text
            return None, f"ONNX Runtime failed: {type(exc).__name__}: {str(exc)[:300]}"

    def ort_chunked(self, xs, states, sizes: Sequence[int]):
        """ORT fed chunk by chunk, states carried: (outputs joined over time, final states)."""
        st: list[Any] = list(states)
        parts: list[list[np.ndarray]] = [[] for _ in range(self.n_out)]
        pos = 0
        for n in sizes:
            out, err = self.ort(self.chunk(xs, pos, pos + n), st)
            if err:
                return None, f"{err} (chunk at step {pos}, length {n})"
            assert out is not None  # ort() returns outputs or an error
            for i in range(self.n_out):
                parts[i].append(out[i])
            st = out[self.n_out :]
            pos += n
        return [_join(p, ax) for p, ax in zip(parts, self.out_axes, strict=True)] + st, None


def _chunkings(T: int, gen: torch.Generator) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {"chunk1": [1] * T}
    sizes["chunk7"] = [7] * (T // 7) + ([T % 7] if T % 7 else [])
    rand, left = [], T
    while left:
        n = min(left, int(torch.randint(1, 65, (1,), generator=gen)))
        rand.append(n)
        left -= n
    sizes["random"] = rand
    return sizes


# ---- conditioning -------------------------------------------------------------------------


def _ends(times: Sequence[int], every: int) -> list[int]:
    """Chunk ends for the float64 walk: every ``every`` steps, and each T of the grid."""
    return sorted({*range(every, max(times) + 1, every), *times})


def _growth(
    sides: _Sides, xs: list[torch.Tensor], s0: list[torch.Tensor], times: Sequence[int]
) -> dict[int, tuple[float, float]]:
    """(kappa of the outputs, kappa of the states) at each T in ``times``, in float64.

    Streamable graphs: a walk along the trajectory in chunks of ``KICK_EVERY`` steps. Each
    chunk starts both runs from the same state, one of them perturbed by ``PERTURBATION`` along
    the direction the previous chunk grew most (renormalised, as in Benettin's method for
    Lyapunov exponents, so a perturbation can neither vanish nor saturate), and measures how
    much the states (``G``) and the outputs (``Y``) grew over the chunk. Local errors of the
    chunk's steps are charged to its start, then carried:
    ``E_j = E_{j-1} * G_j + m_j * max(G_j, 1)`` for the states, and
    ``(E_{j-1} + m_j) * max(Y_j, 1)`` for the outputs within chunk j.
    Others (bidirectional): no trajectory to walk, so the initial state is perturbed once and
    ``kappa = 1 + sum_t g(t)`` over the outputs' growth per step and the states' at T.
    """
    if not s0:  # no state to perturb: assume errors add up step by step
        return {T: (float(T), float(T)) for T in times}
    rows = min(COND_ROWS, s0[0].shape[sides.c.states[0].batch_axis])
    xs = [_narrow(x, t.batch_axis, 0, rows) for x, t in zip(xs, sides.c.inputs, strict=True)]
    s0 = [_narrow(s, sp.batch_axis, 0, rows) for s, sp in zip(s0, sides.c.states, strict=True)]
    x64 = [x.double() if x.is_floating_point() else x for x in xs]
    base = [s.double() for s in s0]
    gen = torch.Generator().manual_seed(1234)
    n_out = sides.n_out

    def unit(ds: list[torch.Tensor]) -> list[torch.Tensor]:
        top = max(float(d.abs().max()) for d in ds)
        if not top > 0:  # vanished below float64 resolution: start a fresh direction
            ds = [torch.randn(d.shape, generator=gen, dtype=torch.float64) for d in ds]
            top = max(float(d.abs().max()) for d in ds)
        return [d / top for d in ds]

    def run(xa, st):
        out = sides.torch(xa, st, sides.flat64)
        return out[:n_out], out[n_out:]

    def spread(ya, yb, eta: float) -> tuple[float, np.ndarray | None]:
        """Largest growth of the untimed outputs, and per-step growth of the timed ones."""
        level, per_step = 0.0, None
        for ta, tb, ax in zip(ya, yb, sides.out_axes, strict=True):
            d = (ta - tb).abs() / eta
            if ax is None or not d.numel():
                level = max(level, float(d.max()) if d.numel() else 0.0)
                continue
            g = d.amax(dim=[i for i in range(d.dim()) if i != ax]).numpy()
            per_step = g if per_step is None else np.maximum(per_step, g)
        return level, per_step

    scale = max(1.0, *(float(s.abs().max()) for s in base))
    eta = PERTURBATION * scale
    kappa: dict[int, tuple[float, float]]
    if not sides.c.streamable:
        kappa = {}
        for T in times:
            xa = sides.chunk(x64, 0, T)
            d = unit([torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in base])
            ya, sa = run(xa, base)
            yb, sb = run(xa, [s + eta * u for s, u in zip(base, d, strict=True)])
            level, per_step = spread(ya, yb, eta)
            g_state = max(float((a - b).abs().max()) / eta for a, b in zip(sa, sb, strict=True))
            g = np.full(T, max(level, g_state))
            if per_step is not None and per_step.size:
                # an output with another length than the input (a convolution without
                # padding: T - 2 steps) is charged its worst step at every step
                g = np.maximum(g, per_step if len(per_step) == T else float(per_step.max()))
            k = 1.0 + float(g.sum())
            kappa[T] = (k, k)
        return kappa

    kappa = {}
    direction = unit([torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in base])
    state, err, prev, k_out, k_state = base, 0.0, 0, 1.0, 1.0
    for end in _ends(times, KICK_EVERY):
        m = end - prev
        xa = sides.chunk(x64, prev, end)
        ya, sa = run(xa, state)
        yb, sb = run(xa, [s + eta * u for s, u in zip(state, direction, strict=True)])
        diffs = [b - a for a, b in zip(sa, sb, strict=True)]
        grow = max(float(d.abs().max()) for d in diffs) / eta
        level, per_step = spread(ya, yb, eta)
        out_gain = max(level, float(per_step.max()) if per_step is not None else 0.0, grow)
        # Outputs are compared at every step up to T, so the worst chunk so far sets their
        # kappa. States too: a chaotic burst can grow a float32 error out of the linear regime
        # (two runs then differ macroscopically), and the float64 walk's later contraction
        # says nothing about how fast such runs come back together (measured: a tanh RNN with
        # recurrent gain 3 had hn 4e-3 apart at T=1000 where the walk's final E was 11).
        k_out = max(k_out, 1.0 + (err + m) * max(out_gain, 1.0))
        err = err * grow + m * max(grow, 1.0)
        k_state = max(k_state, 1.0 + err)
        if end in times:
            kappa[end] = (k_out, k_state)
        direction, state, prev = unit(diffs), sa, end
    return kappa


# ---- the check ----------------------------------------------------------------------------


def _per_step_bytes(sides: _Sides, sample: Sample, T: int = 2, B: int = 1) -> int:
    """Rough memory of one sequence step in one runtime (inputs, outputs, 4x the states)."""
    gen = torch.Generator().manual_seed(0)
    xs, st = sample(B, T, gen)
    out = sides.torch(xs, st)
    io = sum(t.numel() * t.element_size() for t in [*xs, *out[: sides.n_out]]) // (T * B)
    return io + 4 * sum(s.numel() * s.element_size() for s in st) // B


def check_parity(
    flat: nn.Module,
    onnx_path: str | Path,
    contract: Contract,
    sample: Sample,
    *,
    times: Sequence[int] = TIMES,
    batches: Sequence[int] = BATCHES,
    stream: tuple[int, int] | None = (STREAM_T, STREAM_B),
    steps: Sequence[int] = STEPS,
    atol: float = ATOL,
    rtol: float = RTOL,
    seed: int = 0,
    max_bytes: int = MAX_BYTES,
    report: Report | None = None,
    min_time: int = 1,
) -> Report:
    """Compare one graph with the eager module it came from; returns (and extends) a Report.

    ``flat``: ``(*inputs, *states) -> (*outputs, *states)`` in contract order, float32.
    ``stream``: (T, B) of the longest chunked comparison; chunked cases also run at
    ``min(T, CHUNKED_SHORT_T)``. Only streamable graphs get chunked and per-step cases.
    ``min_time``: the shortest sequence the module accepts (``verify_module`` probes it).
    """
    if contract.constants:
        raise InvalidArgument(
            f"{contract.name}: parity checks graphs without constant inputs; "
            f"{[k.name for k in contract.constants]} are declared"
        )
    t0 = time.perf_counter()
    report = report if report is not None else Report()
    sides = _Sides(flat, make_session(onnx_path), contract)
    g = contract.name
    gen = torch.Generator().manual_seed(seed)
    streamable = contract.streamable
    k_max = max(steps) if streamable else 0
    stream_t, stream_b = stream if (stream and streamable) else (0, 0)
    chunk_lengths = sorted({min(stream_t, CHUNKED_SHORT_T), stream_t} - {0})
    per_step = _per_step_bytes(sides, sample, max(2, min_time), min(batches))
    if not streamable:
        report.notes.append(
            f"{g}: not streamable ({contract.extra.get('streamable_reason') or 'bidirectional'}):"
            " judged on whole sequences only"
        )

    def record(mode: str, B: int, T: int, got, err: str | None, ref, kappas):
        for i, name in enumerate(sides.out_names):
            r = ref[i].numpy()
            extra = 0.0
            kappa = None if kappas is None else kappas[0 if i < sides.n_out else 1]
            if kappa is not None:
                extra = LOCAL_ULPS * U * kappa * max(1.0, float(np.abs(r).max(initial=0.0)))
            tol = atol + extra
            if err is not None or got is None:
                report.cases.append(
                    Case(g, mode, B, T, name, float("inf"), float("inf"), False, tol, kappa, err)
                )
                continue
            mx, margin = compare(got[i], r, tol, rtol)
            shape_err = None
            if got[i].shape != r.shape:
                shape_err = f"shape {list(got[i].shape)} from ONNX Runtime, PyTorch {list(r.shape)}"
            ok = shape_err is None and margin <= 1.0
            report.cases.append(Case(g, mode, B, T, name, mx, margin, ok, tol, kappa, shape_err))

    # One sample at the largest batch: a case at batch B runs on its first B rows, so the
    # float64 walk over the first COND_ROWS rows covers every case's own trajectory (B <=
    # COND_ROWS) or the same rows as before (larger B), at the cost of one walk per graph.
    plans: dict[int, list[int]] = {}
    for B in dict.fromkeys([*batches, *([stream_b] if stream_b else [])]):
        lengths = {T for T in times if B in batches} | (
            set(chunk_lengths) if stream_b == B else set()
        )
        for T in sorted(lengths):
            need = 2 * B * (T + k_max) * per_step
            if need <= max_bytes:
                plans.setdefault(B, []).append(T)
            else:
                report.skipped.append(
                    f"{g} B={B} T={T}: needs ~{need / 2**30:.1f} GiB > {max_bytes / 2**30:.1f} GiB"
                )
    if not plans:
        report.seconds += time.perf_counter() - t0
        return report
    n = max(max(ts) for ts in plans.values()) + k_max
    xs_all, s0_all = sample(max(plans), n, gen)
    long = sorted({T for ts in plans.values() for T in ts if T > FIXED_T})
    kappa = _growth(sides, xs_all, s0_all, long) if long else {}
    for T in long:
        k_out, k_state = kappa[T]
        tol = atol + LOCAL_ULPS * U * max(k_out, k_state)
        report.conditioning.append(
            {
                "graph": g,
                "time": T,
                "kappa": max(k_out, k_state),
                "kappa_outputs": k_out,
                "kappa_states": k_state,
                "tol": tol,
                "resolved": bool(tol < RESOLVED_TOL),
            }
        )
    for B, fits in plans.items():
        xs = [_narrow(x, t.batch_axis, 0, B) for x, t in zip(xs_all, contract.inputs, strict=True)]
        s0 = [
            _narrow(s, sp.batch_axis, 0, B) for s, sp in zip(s0_all, contract.states, strict=True)
        ]
        trajectory: dict[int, list[torch.Tensor]] = {0: list(s0)}
        whole_refs: dict[int, list[torch.Tensor]] = {}
        for T in fits:
            xT = sides.chunk(xs, 0, T)
            ref = sides.torch(xT, s0)
            whole_refs[T] = ref
            trajectory[T] = ref[sides.n_out :]
            if B in batches and T in times:
                got, err = sides.ort(xT, s0)
                record("whole", B, T, got, err, ref, kappa.get(T))
        if stream_b == B:
            for T in (t for t in chunk_lengths if t in fits):
                for label, sizes in _chunkings(T, gen).items():
                    got, err = sides.ort_chunked(sides.chunk(xs, 0, T), s0, sizes)
                    record(f"stream/{label}", B, T, got, err, whole_refs[T], kappa.get(T))
        if streamable and B in batches:
            for T in sorted(trajectory):
                if T and T not in times:
                    continue
                st = trajectory[T]
                for k in steps:
                    xk = sides.chunk(xs, T, T + k)
                    got, err = sides.ort(xk, st)
                    record(f"step{k}", B, T, got, err, sides.torch(xk, st), None)
    report.seconds += time.perf_counter() - t0
    return report
