"""Messages <-> runtime values: model info, request inputs (tensors, text or token ids)."""

from __future__ import annotations

import json
import posixpath

import numpy as np

from rnnzoo.contract import Contract, StateSpec, TensorSpec
from rnnzoo.errors import InvalidArgument
from rnnzoo.proto.tensors import from_tensors
from rnnzoo.proto.v1 import rnnzoo_pb2 as pb
from rnnzoo.server.runtime import ModelInfo, Runtime
from rnnzoo.server.runtime.text import text_inputs, token_inputs


def _dims(shape: list) -> list[pb.Dim]:
    return [pb.Dim(size=d) if isinstance(d, int) else pb.Dim(symbol=str(d)) for d in shape]


def _tensor_info(s: TensorSpec) -> pb.TensorInfo:
    return pb.TensorInfo(
        name=s.name,
        dtype=s.dtype,
        shape=_dims(s.shape),
        meaning=s.meaning,
        batch_axis=s.batch_axis,
        time_axis=s.time_axis,
    )


def _state_info(s: StateSpec) -> pb.StateInfo:
    return pb.StateInfo(
        input=s.input,
        output=s.output,
        dtype=s.dtype,
        shape=_dims(s.shape),
        batch_axis=s.batch_axis,
        meaning=s.meaning,
    )


def _graph(role: str, c: Contract) -> pb.Graph:
    return pb.Graph(
        role=role,
        inputs=[_tensor_info(s) for s in c.inputs],
        outputs=[_tensor_info(s) for s in c.outputs],
        states=[_state_info(s) for s in c.states],
        contract_json=public_contract_json(c),
    )


def _public(value):
    """A contract value with absolute paths of this server cut to their file names."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    if (
        isinstance(value, str)
        and len(value) > 1
        and (value.startswith("/") or (len(value) > 2 and value[1:3] in (":\\", ":/")))
    ):
        return posixpath.basename(value.replace("\\", "/"))
    return value


def public_contract_json(c: Contract) -> str:
    """The contract as served: ``source`` and ``extra`` (provenance: checkpoint paths and the
    like) lose the server's absolute paths; everything else is the contract as written."""
    data = json.loads(c.to_json())
    for key in ("source", "extra"):
        if key in data:
            data[key] = _public(data[key])
    return json.dumps(data, sort_keys=True)


def model_info(info: ModelInfo, versions: dict | None = None) -> pb.ModelInfo:
    """``versions``: the repository's table of this model's versions (repository.py)."""
    first = info.contracts.get("model") or info.contracts["encoder"]
    last = info.contract  # the decoder's for seq2seq
    return pb.ModelInfo(
        version=info.version,
        versions=[
            pb.ModelVersion(version=v, state=vs.state, reason=vs.reason)
            for v, vs in sorted((versions or {}).items())
        ],
        name=info.name,
        task=info.task,
        streamable=info.streamable,
        description=info.description,
        graphs=[_graph(role, c) for role, c in info.contracts.items()],
        vocab=first.vocab or [],
        target_vocab=last.target_vocab or [],
        labels=last.labels or first.labels or [],
        special_tokens=last.special_tokens or first.special_tokens,
        normalization=first.normalization or {},
    )


def request_inputs(runtime: Runtime, model: str, req, *, batched: bool) -> dict[str, np.ndarray]:
    """The model's inputs from a request carrying exactly one of inputs / text / tokens.

    ``batched``: Infer takes a batch axis; text and token ids then form a batch of one.
    """
    has_text, has_tokens = bool(req.text), req.HasField("tokens")
    if req.inputs and not has_text and not has_tokens:  # the per-step streaming case
        return from_tensors(req.inputs, what="input")
    given = [
        k
        for k, on in (("inputs", bool(req.inputs)), ("text", has_text), ("tokens", has_tokens))
        if on
    ]
    if len(given) != 1:
        raise InvalidArgument(f"send exactly one of inputs, text or tokens; got {given or 'none'}")
    if given[0] == "text":
        return text_inputs(runtime, model, [req.text], batched)
    return token_inputs(runtime, model, req.tokens.ids, batched)
