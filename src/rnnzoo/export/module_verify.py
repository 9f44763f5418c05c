"""``verify_module``: an export of ``export_module``/``export_step`` against the module it came from.

The contract records how the graph's flat signature maps onto the module's own forward (the
lifting plan, or the step's argument layout), so the same eager wrapper that was traced is
rebuilt around the module given here and compared with ONNX Runtime by the parity engine
(``rnnzoo.export.parity.check_parity``) on random inputs and states laid out as the contract
says (``rnnzoo.export.sampling``). The zoo's ``verify_net`` is this with ``FlatNet(net)``.

The eager side runs on one intra-op thread (``rnnzoo.export.native.one_thread``): the
float64 reference walks long sequences a few steps per call, and such small calls are
fastest single-threaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rnnzoo.contract import Contract, read_contract
from rnnzoo.errors import FailedPrecondition, InvalidArgument
from rnnzoo.export.guard import doing, guarded
from rnnzoo.export.lifting import FlatModule, Plan
from rnnzoo.export.native import one_thread
from rnnzoo.export.sampling import make_sampler
from rnnzoo.export.step_export import eager_flat

QUICK = {"times": (1, 2, 7, 64), "batches": (1, 3), "stream": (64, 3)}


def eager_module(module: nn.Module, contract: Contract) -> nn.Module:
    """The eager module with the graph's flat signature, rebuilt from the contract's record."""
    if "lifting" in contract.extra:
        return FlatModule(module, Plan.from_dict(contract.extra["lifting"]))
    if "step" in contract.extra:
        return eager_flat(module, contract)
    raise FailedPrecondition(
        f"{contract.name}: its contract records no lifting plan or step layout: it was not "
        "written by export_module/export_step (or by an rnnzoo older than the one exporter: "
        "re-export it, e.g. `rnnzoo export CHECKPOINT`)"
    )


@guarded("verify_module")
def verify_module(
    module: nn.Module,
    path: str | Path,
    *,
    quick: bool = False,
    contract: Contract | None = None,
    **kw: Any,
) -> Any:
    """Compare ``path`` with ``module``; returns the parity ``Report`` (``.ok``, ``.failures``).

    ``quick``: T <= 64 and B <= 3 only. ``contract``: the graph's (default: read from
    ``path``). Other keywords go to ``check_parity`` (``times``, ``batches``, ``stream``,
    ``seed``, ``atol``, ``rtol``, ``report``).
    """
    from rnnzoo.export.parity import BATCHES, STREAM_B, STREAM_T, TIMES, check_parity

    contract = contract or read_contract(path)
    flat = eager_module(module, contract)
    kw = {**(QUICK if quick else {}), **kw}
    sample = make_sampler(contract)
    notes: list[str] = []
    timed = any(t.time_axis is not None for t in contract.inputs)
    if not timed:
        # A one-step graph (export_step mode="step"): there is no time axis to chunk; its
        # per-step cases advance it from states along the reference trajectory.
        kw["stream"] = None
    with one_thread(), doing("finding the shortest sequence and smallest batch it accepts"):
        fixed_b = fixed_batch(contract)
        t_min, b_min, why = smallest_sizes(flat, sample, timed=timed, fixed_b=fixed_b)
    if fixed_b is not None:
        kw["batches"] = (fixed_b,)
        notes.append(f"the graph's batch is fixed at {fixed_b}: only that batch size is compared")
    elif b_min > 1:
        kw["batches"] = tuple(
            sorted({b_min, *(b for b in kw.get("batches", BATCHES) if b >= b_min)})
        )
        notes.append(f"smallest batch the module accepts: {b_min} ({why})")
    if t_min > 1:
        times = kw.get("times", TIMES)
        kw["times"] = tuple(sorted({t_min, *(t for t in times if t >= t_min)}))
        notes.append(
            f"shortest sequence the module accepts: T={t_min} (T={t_min - 1}: {why}); "
            f"compared at T in {list(kw['times'])}"
        )
    if kw.get("stream", (STREAM_T, STREAM_B)) is not None:
        st_t, st_b = kw.get("stream", (STREAM_T, STREAM_B))
        kw["stream"] = (max(st_t, t_min), fixed_b if fixed_b is not None else max(st_b, b_min))
    with one_thread(), doing("comparing ONNX Runtime with PyTorch on random inputs"):
        report = check_parity(flat, path, contract, sample, min_time=t_min, **kw)
    report.notes.extend(notes)
    return report


def fixed_batch(contract: Contract) -> int | None:
    """The batch size of a graph whose batch is not symbolic (a module that runs at its
    example's batch only), else None."""
    if any(t.batch_axis is not None for t in contract.inputs):
        return None
    for st in contract.states:
        d = st.shape[st.batch_axis]
        if isinstance(d, int):
            return d
    return None


def smallest_sizes(
    flat: nn.Module, sample: Any, *, timed: bool, fixed_b: int | None, limit: int = 32
) -> tuple[int, int, str]:
    """(shortest T, smallest B, why a smaller one failed) that the eager module runs at."""
    gen = torch.Generator().manual_seed(0)
    why = ""

    def runs(B: int, T: int) -> bool:
        nonlocal why
        xs, st = sample(B, T, gen)
        try:
            with torch.no_grad():
                flat(*xs, *st)
            return True
        except Exception as exc:  # the module's own refusal of this size
            text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            why = f"{type(exc).__name__}: {text}"
            return False

    b_min = fixed_b if fixed_b is not None else 1
    t_min = 1
    for t_min in range(1, (limit if timed else 1) + 1):
        if runs(b_min, t_min):
            break
    else:
        if fixed_b is None:
            for b_min in range(2, 5):
                if runs(b_min, limit):
                    break
            else:
                raise InvalidArgument(
                    f"the module fails at every sequence length up to {limit} and batch size up "
                    f"to 4 ({why}): check that module(*example_inputs) runs in PyTorch"
                )
            t_min, b_min, why2 = smallest_sizes(flat, sample, timed=timed, fixed_b=b_min)
            return t_min, b_min, why2 or why
        raise InvalidArgument(
            f"the module fails at every sequence length up to {limit} ({why}): check that "
            "module(*example_inputs) runs in PyTorch"
        )
    return t_min, b_min, why
