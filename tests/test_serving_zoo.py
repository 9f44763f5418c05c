"""Every zoo entry's architecture, exported and served: streamed outputs equal PyTorch.

Each registered entry's own config (cell, depth, directions, input kind), shrunk and with
random weights, is exported with ``rnnzoo.export`` and served by a real gRPC server on a
loopback port. Streaming step by step, in random chunks, and across a disconnect + resume
must give what the whole-sequence PyTorch model gives (<= 1e-5). seq2seq entries are served
through ``Generate`` only; their greedy decoding is checked in test_export/test_runtime_generate.
"""

import numpy as np
import pytest
import torch

from rnnzoo.client import Client
from rnnzoo.export.onnx_export import export_model
from rnnzoo.models import zoo
from rnnzoo.models.train import build_model
from rnnzoo.server.runtime import Runtime
from rnnzoo.server.transport.server import BackgroundServer, ServerConfig

ATOL = 1e-5
T = 23


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("served-zoo")
    nets = {}
    for name, entry in zoo.REGISTRY.items():
        cfg = entry.model_config(quick=True)
        cfg.update({k: 6 for k in ("hidden_size", "embed_size") if k in cfg})
        torch.manual_seed(0)
        model = build_model(entry.family, cfg).eval()
        task = entry.make_task(quick=True).metadata()  # vocab, labels, special tokens...
        export_model(model, d / f"{name}.onnx", name=name, task=task)
        nets[name] = model
    server = BackgroundServer(lambda: Runtime.from_dir(d), ServerConfig(port=0)).start()
    try:
        with Client(server.target) as client:
            yield client, nets
    finally:
        server.stop()


def _sequence(net, rng):
    cfg = net.cfg
    if cfg.vocab_size is not None:
        return rng.integers(0, cfg.vocab_size, size=T).astype(np.int64)
    return rng.normal(size=(T, cfg.input_size)).astype(np.float32)


def _offline(net, seq):
    with torch.no_grad():
        y, _ = net(torch.from_numpy(seq[None]))
    return y[0].numpy()  # (T, O)


def _collect(outputs, into):
    for out in outputs:  # revised outputs (non-streamable) re-cover the prefix
        into[out.start : out.start + len(out.value)] = out.value
    return into


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.REGISTRY))
def test_streamed_equals_offline(served, name):
    client, nets = served
    net = nets[name]
    info = client.model(name)
    if info.task == "seq2seq":
        text = "".join(client.generate(name, "12", max_tokens=5, temperature=0))
        vocab = set(info.target_vocab)
        assert vocab, "the seq2seq contract lost its target vocabulary"
        # word-level target: the pieces come back separated by spaces, each a known word
        assert not text or all(w in vocab for w in text.split(" ")), text
        return
    rng = np.random.default_rng(len(name))
    seq = _sequence(net, rng)
    want = _offline(net, seq)

    # one step per request
    with client.session(name) as s:
        got = _collect((s.step(seq[t : t + 1]) for t in range(T)), np.full_like(want, np.nan))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)

    # random chunks, with a disconnect and a resume by id in the middle
    cuts = np.sort(rng.choice(np.arange(1, T), size=4, replace=False))
    chunks = np.split(seq, cuts)
    got = np.full_like(want, np.nan)
    s = again = client.session(name)
    try:
        _collect((s.step(c) for c in chunks[:2]), got)
        s.detach()  # the stream ends; the session lives on
        again = client.resume(s.id, name)
        _collect((again.step(c) for c in chunks[2:]), got)
    finally:
        again.close()  # ends the resumed stream first: an attached session refuses CloseSession
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
