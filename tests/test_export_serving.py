"""Graphs written by ``export_module``/``export_step`` are served end to end.

A user's module with no state in its signature (Embedding + 2-layer LSTM + Linear) is exported
with lifted state, and a hand-written GRU step both as a Scan and as a one-step graph; a real
gRPC server on a loopback port serves the folder, and ``rnnzoo.client.Client`` streams random
chunks (or single steps) with the state carried by the server. What comes back must equal the
module's own whole-sequence run (<= 1e-5).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from rnnzoo.client import Client
from rnnzoo.export.module_export import export_module
from rnnzoo.export.step_export import export_step
from rnnzoo.server.runtime import Runtime
from rnnzoo.server.transport.server import BackgroundServer, ServerConfig

ATOL = 1e-5
T = 37


class TokenLSTM(nn.Module):
    """Embedding + 2-layer LSTM + Linear; no state in the signature."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 5)
        self.lstm = nn.LSTM(5, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 13)

    def forward(self, tokens):
        out, _ = self.lstm(self.emb(tokens))
        return self.head(out)


class GRUStep(nn.Module):
    """A GRU cell written from plain parameters: (x_t, h) -> (y_t, h')."""

    def __init__(self, F: int = 3, H: int = 5) -> None:
        super().__init__()
        k = H**-0.5
        self.w_ih = nn.Parameter(torch.empty(3 * H, F).uniform_(-k, k))
        self.w_hh = nn.Parameter(torch.empty(3 * H, H).uniform_(-k, k))
        self.b_ih = nn.Parameter(torch.empty(3 * H).uniform_(-k, k))
        self.b_hh = nn.Parameter(torch.empty(3 * H).uniform_(-k, k))
        self.head = nn.Linear(H, 2)

    def forward(self, x, h):
        ir, iz, i_n = (x @ self.w_ih.T + self.b_ih).chunk(3, dim=1)
        hr, hz, h_n = (h @ self.w_hh.T + self.b_hh).chunk(3, dim=1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        h = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
        return self.head(h), h


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("served-modules")
    torch.manual_seed(0)
    lm = TokenLSTM().eval()
    export_module(
        lm, (torch.randint(0, 13, (2, 5)),), d / "lm.onnx", name="lm", output_names=["logits"]
    )
    step = GRUStep().eval()
    example = (torch.randn(2, 3), torch.zeros(2, 5))
    export_step(step, example, d / "scan.onnx", name="gru-scan")
    export_step(step, example, d / "one.onnx", name="gru-one", mode="step")
    server = BackgroundServer(lambda: Runtime.from_dir(d), ServerConfig(port=0)).start()
    try:
        with Client(server.target) as client:
            yield client, lm, step
    finally:
        server.stop()


def _chunks(n: int, rng: np.random.Generator) -> list[slice]:
    cuts = np.sort(rng.choice(np.arange(1, n), size=6, replace=False))
    bounds = [0, *cuts.tolist(), n]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _step_loop(step: nn.Module, xs: np.ndarray) -> np.ndarray:
    h, ys = torch.zeros(1, 5), []
    with torch.no_grad():
        for x in torch.from_numpy(xs):
            y, h = step(x[None], h)
            ys.append(y[0].numpy())
    return np.stack(ys)


def test_lifted_state_module_streams_through_the_server(served):
    client, lm, _ = served
    info = client.model("lm")
    assert info.streamable
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 13, size=T).astype(np.int64)
    with torch.no_grad():
        want = lm(torch.from_numpy(tokens[None]))[0].numpy()  # (T, 13), from zero state
    got = np.full_like(want, np.nan)
    with client.session("lm") as s:
        for sl in _chunks(T, rng):
            out = s.step(tokens[sl])
            assert out.start == sl.start and not out.revised
            got[sl] = out["logits"]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # and the whole sequence in one call
    whole = client.infer("lm", tokens[None])["logits"][0]
    np.testing.assert_allclose(whole, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gru-scan", "gru-one"])
def test_step_module_graphs_stream_through_the_server(served, name):
    client, _, step = served
    assert client.model(name).streamable
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(T, 3)).astype(np.float32)
    want = _step_loop(step, xs)  # (T, 2)
    got = np.full_like(want, np.nan)
    with client.session(name) as s:
        if name == "gru-scan":  # random chunks of the time axis
            for sl in _chunks(T, rng):
                got[sl] = s.step(xs[sl])["y"]
        else:  # no time axis: one step per message, the state carried by the server
            for t in range(T):
                out = s.step(xs[t])
                assert out.start == t and not out.revised
                got[t] = out["y"]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
