"""The benchmarked model: a real rnnzoo export of a 2-layer LSTM forecaster (H=128, F=1).

Random weights (seeded): speed does not depend on what the weights learned. The torch module
is kept for the PyTorch eager loop, so (E) runs the very weights (A)-(D) serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NAME = "bench_lstm"


@dataclass
class BenchModel:
    net: object  # rnnzoo.models.rnn.RecurrentNet (torch), eval mode
    onnx_path: Path
    model_dir: Path  # what the servers load
    name: str = NAME


def build(model_dir: Path, hidden: int = 128, layers: int = 2, seed: int = 0) -> BenchModel:
    import torch

    from rnnzoo.export.onnx_export import export_model
    from rnnzoo.models.rnn import RecurrentNet, RNNConfig

    torch.manual_seed(seed)
    cfg = RNNConfig("lstm", hidden, num_layers=layers, input_size=1, output_size=1)
    net = RecurrentNet(cfg).eval()
    path = Path(model_dir) / f"{NAME}.onnx"
    (path,) = export_model(net, path, name=NAME, task={"kind": "forecast"})
    return BenchModel(net, path, Path(model_dir))
