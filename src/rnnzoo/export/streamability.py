"""Is a lifted module streamable? Decided by running it, not by guessing from its layers.

A model streams when feeding a sequence chunk by chunk, carrying the state outputs into the
next chunk's state inputs, gives what the whole sequence gives: the outputs concatenated along
their time axes and the final states. ``check_streamable`` runs exactly that in PyTorch, in
float64 (so rounding cannot hide or fake a difference), on random inputs and states, for a
few chunkings. An output without a time axis (``out[:, -1]``, pooling) cannot be streamed in
that sense at all. When the check fails, the reason names the likely culprits it can see:
bidirectional layers, ``Conv1d`` with kernel > 1, attention.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn

from rnnzoo.contract import Contract
from rnnzoo.export.probe import is_recurrent
from rnnzoo.export.sampling import Sampler

CHUNKINGS = ([1] * 9, [4, 5], [2, 3, 4], [8, 1])
TOL = 1e-9  # float64: a streamable model agrees to rounding, a non-streamable one by far more


def _suspects(module: nn.Module) -> list[str]:
    found = []
    inner = getattr(module, "module", module)  # a FlatModule's user module: the user's names
    for name, m in inner.named_modules():
        if is_recurrent(m) and m.bidirectional:
            found.append(f"bidirectional layer {name!r} (its backward direction reads the future)")
        elif isinstance(m, nn.Conv1d) and m.kernel_size[0] > 1:
            found.append(f"{name!r} is a Conv1d with kernel {m.kernel_size[0]} (it mixes steps)")
        elif isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)):
            found.append(f"{name!r} attends over the whole sequence")
    return found


def _causal(f64: nn.Module, contract: Contract, data: list, states: list, cut: int) -> bool:
    """Whether the outputs before step ``cut`` ignore the inputs from ``cut`` on."""
    gen = torch.Generator().manual_seed(1)
    changed = []
    for spec, d in zip(contract.inputs, data, strict=True):
        if spec.time_axis is None or not d.is_floating_point():
            changed.append(d)
            continue
        d = d.clone()
        tail = d.narrow(spec.time_axis, cut, d.shape[spec.time_axis] - cut)
        tail.copy_(torch.randn(tail.shape, generator=gen, dtype=d.dtype))
        changed.append(d)
    try:
        with torch.no_grad():
            a = f64(*data, *states)
            b = f64(*changed, *states)
    except Exception:  # the module refuses the changed values: no verdict on causality
        return False
    for spec, x, y in zip(contract.outputs, a, b, strict=False):
        x, y = x.narrow(spec.time_axis, 0, cut), y.narrow(spec.time_axis, 0, cut)
        if float((x - y).abs().max()) > TOL * (1 + float(x.abs().max())):
            return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def check_streamable(
    flat: nn.Module, contract: Contract, sample: Sampler, *, seed: int = 0
) -> tuple[bool, str]:
    """(streamable, reason). ``flat`` has the contract's flat signature.

    A module that fails on the chunks (one too short for its convolution, say) is not
    streamable, and the reason says which chunk failed and how.
    """
    no_time = [t.name for t in contract.outputs if t.time_axis is None]
    if no_time:
        return False, (
            f"output {', '.join(repr(n) for n in no_time)} has no time axis: it summarises the "
            "whole sequence (e.g. out[:, -1] or pooling over time), so chunks cannot give it"
        )
    f64 = copy.deepcopy(flat).double().eval()
    gen = torch.Generator().manual_seed(seed)
    T = sum(CHUNKINGS[0])
    data, states = sample(2, T, gen)
    data = [d.double() if d.is_floating_point() else d for d in data]
    states = [s.double() for s in states]
    n_out = len(contract.outputs)
    try:
        with torch.no_grad():
            whole = f64(*data, *states)
    except Exception as exc:
        return False, (
            f"not shown streamable: the module fails on 2 random sequences of {T} steps "
            f"({_first_line(exc)}), so chunks could not be compared with the whole"
        )
    worst, where = 0.0, ""
    for sizes in CHUNKINGS:
        st, pos, pieces = list(states), 0, []
        for n in sizes:
            chunk = [
                d.narrow(spec.time_axis, pos, n) if spec.time_axis is not None else d
                for spec, d in zip(contract.inputs, data, strict=True)
            ]
            try:
                with torch.no_grad():
                    got = f64(*chunk, *st)
            except Exception as exc:  # the user's code refuses a chunk: that is the answer
                return False, (
                    f"the module fails on a chunk of {n} steps at step {pos} (chunks {sizes}) "
                    f"where the whole sequence of {T} steps runs: {_first_line(exc)}"
                )
            pieces.append(got[:n_out])
            st = list(got[n_out:])
            pos += n
        outs = [
            torch.cat([p[i] for p in pieces], dim=cast(int, spec.time_axis))  # no_time: none
            for i, spec in enumerate(contract.outputs)
        ]
        names = [t.name for t in contract.outputs] + [s.output for s in contract.states]
        for name, a, b in zip(names, [*outs, *st], whole, strict=True):
            err = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
            if err > TOL * (1 + float(b.abs().max())) and err > worst:
                worst, where = err, f"{name!r} with chunks {sizes}"
    if not worst:
        return True, "chunked runs with the state carried equal the whole sequence (float64)"
    culprits = _suspects(flat)
    if _causal(f64, contract, data, states, T // 2):  # then no layer reads the future
        why = (
            "the outputs depend only on earlier steps, but through something other than the "
            "recurrent states carried between chunks (a cumulative statistic such as a "
            "cumulative LayerNorm, a convolution's or a window's context, a position-dependent "
            "op): each chunk starts it afresh"
        )
    elif culprits:
        why = "; ".join(culprits)
    else:
        why = "an output at step t depends on later steps"
    return False, (
        f"chunked runs with the state carried differ from the whole sequence by {worst:.1e} "
        f"on {where}: {why}"
    )
