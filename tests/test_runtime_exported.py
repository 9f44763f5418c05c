"""The runtime serving real models from the torch exporter: streamed steps == torch."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx_export = pytest.importorskip("rnnzoo.export.onnx_export")
from rnnzoo.models.rnn import RecurrentNet, RNNConfig  # noqa: E402
from rnnzoo.server.runtime import Runtime  # noqa: E402

CONFIGS = {
    "lstm2": RNNConfig("lstm", 8, num_layers=2, input_size=3, output_size=2),
    "bigru": RNNConfig("gru", 8, bidirectional=True, input_size=3, output_size=2),
    "scratch": RNNConfig("gru_scratch", 8, input_size=3, output_size=2),
    "tok": RNNConfig("lstm", 8, vocab_size=11, embed_size=4, output_size=11),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("exported")
    nets = {}
    for name, cfg in CONFIGS.items():
        net = RecurrentNet(cfg).eval()
        onnx_export.export_model(net, d / f"{name}.onnx", name=name)
        nets[name] = net
    return d, nets


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
async def test_streamed_steps_equal_torch(exported, name):
    d, nets = exported
    rng = np.random.default_rng(1)
    if CONFIGS[name].vocab_size:
        x, key = rng.integers(0, 11, 7).astype(np.int64), "tokens"
    else:
        x, key = rng.normal(size=(7, 3)).astype(np.float32), "x"
    rt = Runtime.from_dir(d)
    await rt.start()
    try:
        s = await rt.create_session(name)
        outs = []
        for a, b in [(0, 1), (1, 4), (4, 7)]:
            r = await rt.step(s.id, {key: x[a:b]})
            outs.append(r.outputs[rt.get_model(name).contract.outputs[0].name])
        got = outs[-1] if r.revised else np.concatenate(outs)
        assert r.revised == CONFIGS[name].bidirectional
        with torch.no_grad():
            want = nets[name](torch.from_numpy(x[None]))[0][0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
    finally:
        await rt.stop()
