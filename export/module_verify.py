"""``verify_module``: an export of ``export_module``/``export_step`` against the module it came from.

The contract records how the graph's flat signature maps onto the module's own forward (the
lifting plan, or the step's argument layout), so the same eager wrapper that was traced is
rebuilt around the module given here and compared with ONNX Runtime by the parity engine
(``rnnzoo.export.parity.check_parity``) on random inputs and states laid out as the contract
says (``rnnzoo.export.sampling``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from rnnzoo.contract import Contract, read_contract
from rnnzoo.errors import FailedPrecondition
from rnnzoo.export.lifting import FlatModule, Plan
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
        "written by export_module/export_step (zoo checkpoints verify with `rnnzoo verify`)"
    )


def verify_module(module: nn.Module, path: str | Path, *, quick: bool = False, **kw: Any) -> Any:
    """Compare ``path`` with ``module``; returns the parity ``Report`` (``.ok``, ``.failures``).

    ``quick``: T <= 64 and B <= 3 only. Other keywords go to ``check_parity`` (``times``,
    ``batches``, ``stream``, ``seed``, ``atol``, ``rtol``, ``report``).
    """
    from rnnzoo.export.parity import check_parity

    contract = read_contract(path)
    flat = eager_module(module, contract)
    kw = {**(QUICK if quick else {}), **kw}
    return check_parity(flat, path, contract, make_sampler(contract), **kw)
