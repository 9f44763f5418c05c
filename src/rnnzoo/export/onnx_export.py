"""The zoo's own models to ONNX: ``RecurrentNet`` / ``Seq2Seq`` through ``export_module``'s path.

A ``RecurrentNet`` is exported as ``FlatNet(net)``, whose forward ``(x, h0[, c0]) -> (y, hn[,
cn])`` takes and returns the state itself, so ``export_graph`` (the engine of
``export_module``) uses those arguments as the state I/O: the same probe, stand-ins (native
``RNN``/``GRU``/``LSTM`` nodes for ``nn.*`` cores, a ``Scan`` over the cell's own step for
hand-written ``ScratchRNN`` cores), graph checks and contract building as any user's module.
``rnnzoo.export.contract_builder.zoo_graph`` adds the served names of docs/design.md
(``x``/``tokens``, ``h0``/``c0``, ``y``/``logits``, ``hn``/``cn``) and what only the checkpoint
knows (task, vocabularies, labels, normalization, special tokens, seq2seq role and group).
Nothing is written unless every graph passes its checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rnnzoo.errors import InvalidArgument
from rnnzoo.export.contract_builder import zoo_graph
from rnnzoo.export.graph import write_model
from rnnzoo.export.module_export import export_graph
from rnnzoo.export.probe import is_recurrent
from rnnzoo.models.rnn import RecurrentNet, Seq2Seq


class FlatNet(nn.Module):
    """Flat signature for the exporter and parity: (x, h0[, c0]) -> (y, hn[, cn])."""

    def __init__(self, net: RecurrentNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None = None):
        state = (h0,) if c0 is None else (h0, c0)
        y, new_state = self.net(x, state)
        return (y, *new_state)


def example_inputs(net: RecurrentNet) -> tuple[torch.Tensor, ...]:
    """``(x, h0[, c0])`` for ``FlatNet(net)``: B=2, T=3, non-zero states (sizes don't matter:
    the exporter re-sizes them)."""
    cfg = net.cfg
    B, T = 2, 3
    if cfg.vocab_size is not None:
        x = torch.randint(0, cfg.vocab_size, (B, T), dtype=torch.int64)
    else:
        x = torch.randn(B, T, cfg.input_size)
    return (x, *(0.1 * s + 0.1 for s in net.initial_state(B)))


def export_model(
    model: RecurrentNet | Seq2Seq,
    out: str | Path,
    *,
    name: str,
    task: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_sha256: str | None = None,
) -> list[Path]:
    """Export a model to ``out`` (seq2seq: ``out`` minus .onnx plus .encoder/.decoder.onnx).

    Every graph is built and checked before the first file is written.
    """
    source = {}
    if checkpoint is not None:
        source["checkpoint"] = str(Path(checkpoint).resolve())
        source["checkpoint_sha256"] = checkpoint_sha256 or ""
    out = Path(out)
    if isinstance(model, Seq2Seq):
        base = out.name.removesuffix(".onnx")
        parts = [
            ("encoder", model.encoder, out.with_name(f"{base}.encoder.onnx")),
            ("decoder", model.decoder, out.with_name(f"{base}.decoder.onnx")),
        ]
        group, family = name, "seq2seq"
    elif isinstance(model, RecurrentNet):
        parts = [("model", model, out)]
        group, family = None, "rnn"
    else:
        raise InvalidArgument(
            f"cannot export {type(model).__name__}: rnnzoo exports RecurrentNet and Seq2Seq"
        )
    protos = []
    for role, net, path in parts:
        if not is_recurrent(net.rnn):
            raise InvalidArgument(
                f"cannot export a recurrent core of type {type(net.rnn).__name__}: supported "
                "are nn.RNN, nn.GRU, nn.LSTM and rnnzoo's ScratchRNN"
            )
        kw = zoo_graph(net.cfg, task, role, group)
        kw["contract_fields"]["extra"] = {"family": family, "config": net.cfg.to_dict()}
        _, proto = export_graph(
            FlatNet(net.eval()),
            example_inputs(net),
            name=name if role == "model" else f"{name}.{role}",
            source=source,
            **kw,
        )
        protos.append((proto, path))
    return [write_model(m, p) for m, p in protos]
