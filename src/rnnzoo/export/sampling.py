"""Random inputs and states laid out as a contract says: what parity and the streaming check feed.

``make_sampler(contract)`` returns ``sample(B, T, gen) -> (data_inputs, states)``: every
``"batch"`` dim becomes ``B`` and every ``"time"`` dim ``T``; float inputs are standard normal,
integer inputs (token ids) uniform below the bound recorded in ``contract.extra["int_high"]``
(an embedding's size, else one more than the example's largest id); hidden states are uniform
in (-1, 1), the range a tanh-bounded hidden state lives in, and LSTM cell states (part 1 of a
call in the contract's lifting plan), which are unbounded, standard normal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rnnzoo.contract import Contract, StateSpec, TensorSpec
from rnnzoo.export.contract_builder import BATCH, TIME

Sampler = Callable[[int, int, torch.Generator], tuple[list[torch.Tensor], list[torch.Tensor]]]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def concrete_shape(shape: list, B: int, T: int) -> list[int]:
    return [B if d == BATCH else T if d == TIME else int(d) for d in shape]


def make_sampler(contract: Contract) -> Sampler:
    highs = dict(contract.extra.get("int_high") or {})
    lengths = dict(contract.extra.get("lengths") or {})

    def one(spec: TensorSpec, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
        shape = concrete_shape(spec.shape, B, T)
        dtype = DTYPES[spec.dtype]
        if spec.name in lengths:  # ragged, longest first, the longest filling the time axis
            steps = torch.randint(1, T + 1, shape, generator=gen)
            steps[0] = T
            steps = steps.sort(descending=True).values
            return (steps / T if lengths[spec.name] == "fraction" else steps).to(dtype)
        if dtype.is_floating_point:
            return torch.randn(shape, generator=gen).to(dtype)
        if dtype == torch.bool:
            return torch.rand(shape, generator=gen) < 0.5
        return torch.randint(0, int(highs.get(spec.name, 2)), shape, generator=gen).to(dtype)

    refs = (contract.extra.get("lifting") or {}).get("states") or []
    cell = [bool(r.get("part")) for r in refs] if len(refs) == len(contract.states) else []
    cell = cell or [False] * len(contract.states)

    def state(spec: StateSpec, is_cell: bool, B: int, T: int, gen: torch.Generator):
        shape = concrete_shape(spec.shape, B, T)
        if is_cell:
            return torch.randn(shape, generator=gen).to(DTYPES[spec.dtype])
        return (torch.rand(shape, generator=gen) * 2 - 1).to(DTYPES[spec.dtype])

    def sample(B: int, T: int, gen: torch.Generator):
        data = [one(spec, B, T, gen) for spec in contract.inputs]
        states = [state(s, c, B, T, gen) for s, c in zip(contract.states, cell, strict=True)]
        return data, states

    return sample
