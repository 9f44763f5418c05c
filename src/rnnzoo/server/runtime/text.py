"""Text and token ids as model inputs, for every protocol.

A model whose contract has a vocabulary and one input (a token-id input, ``(batch, time)``
int64) also takes text: each character is looked up in the vocabulary (``Runtime.encode_text``,
bounded by ``max_request_steps`` before the walk), or token ids given as a list. rnnzoo.v1
sends them as ``text`` / ``tokens``; KServe v2 as a BYTES tensor (UTF-8 strings). Both end
here, so the two protocols accept and refuse exactly the same things.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from rnnzoo.contract import Contract
from rnnzoo.errors import InvalidArgument

from .redact import clip

if TYPE_CHECKING:
    from .runtime import Runtime


def text_contract(runtime: Runtime, model: str) -> Contract:
    """The contract of a model that takes text, or InvalidArgument saying it does not."""
    contract = runtime.get_model(model).contracts.get("model")
    if contract is None or not contract.vocab or len(contract.inputs) != 1:
        raise InvalidArgument(
            f"model {clip(model)!r} does not take text or token ids; send its named tensors"
        )
    return contract


def text_inputs(
    runtime: Runtime, model: str, texts: Sequence[str], batched: bool
) -> dict[str, np.ndarray]:
    """The model's inputs from texts: one text without a batch axis (``batched=False``, a
    stream chunk), or a batch of texts of equal length."""
    contract = text_contract(runtime, model)
    if not texts:
        raise InvalidArgument("no text given; send at least one string")
    if not batched and len(texts) != 1:
        raise InvalidArgument(f"one sequence takes one text, got {len(texts)}")
    rows = [runtime.encode_text(model, t) for t in texts]
    if len({r.size for r in rows}) != 1:
        raise InvalidArgument(
            f"texts of a batch must have the same length (nothing is padded: padding changes "
            f"a recurrent state); got lengths {sorted({r.size for r in rows})[:8]}"
        )
    if rows[0].size == 0:
        raise InvalidArgument("the text is empty; send at least one character")
    return {contract.inputs[0].name: np.stack(rows) if batched else rows[0]}


def token_inputs(
    runtime: Runtime, model: str, ids: Sequence[int], batched: bool
) -> dict[str, np.ndarray]:
    """The model's inputs from one sequence of token ids (a batch of one when ``batched``)."""
    contract = text_contract(runtime, model)
    runtime.check_steps(len(ids), "tokens")  # before numpy copies them
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size == 0:
        raise InvalidArgument("tokens is empty; send at least one token id")
    return {contract.inputs[0].name: arr[None, :] if batched else arr}
