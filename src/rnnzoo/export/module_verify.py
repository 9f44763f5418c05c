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

from torch import nn

from rnnzoo.contract import Contract, read_contract
from rnnzoo.errors import FailedPrecondition
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
    from rnnzoo.export.parity import check_parity

    contract = contract or read_contract(path)
    flat = eager_module(module, contract)
    kw = {**(QUICK if quick else {}), **kw}
    if not any(t.time_axis is not None for t in contract.inputs):
        # A one-step graph (export_step mode="step"): there is no time axis to chunk; its
        # per-step cases advance it from states along the reference trajectory.
        kw["stream"] = None
    with one_thread(), doing("comparing ONNX Runtime with PyTorch on random inputs"):
        return check_parity(flat, path, contract, make_sampler(contract), **kw)
