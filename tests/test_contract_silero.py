"""``rnnzoo contract init`` on a graph nobody here wrote: Silero VAD v6, the ONNX file shipped in
the ``silero-vad`` PyPI package (pinned in scripts/setup-gallery.sh). Its graph names no dim
(``input: [?, ?]``, ``stateN: [?, ?, ?]``), takes one window of 192-703 samples at 16 kHz,
and a sample-rate scalar ``sr``. ``init`` plus setting ``sr`` must be all a user does before
``contract check`` passes and ``rnnzoo serve`` streams it; the served outputs are checked
against ONNX Runtime run on the file directly, and, once the user declares the 64-sample
context Silero's own wrapper prepends, against that wrapper (``OnnxWrapper``) itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from gallery_venv import gallery_python, silero_file
from test_server_cli import _wait_listening

from rnnzoo.cli import main
from rnnzoo.client import Client
from rnnzoo.contract import sidecar_path

SR, N, K = 16000, 512, 64  # sample rate, Silero's chunk and the context its wrapper keeps
TOL = 1e-5
SERVE = [sys.executable, "-m", "rnnzoo.cli", "serve"]


def _resonate(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    """A two-pole resonator: one formant."""
    r = np.exp(-np.pi * bandwidth / SR)
    a1, a2 = 2 * r * np.cos(2 * np.pi * freq / SR), -r * r
    y = np.zeros_like(x)
    for i in range(len(x)):
        y[i] = x[i] + a1 * (y[i - 1] if i else 0.0) + a2 * (y[i - 2] if i > 1 else 0.0)
    return y


def vowels(n: int, seed: int = 0) -> np.ndarray:
    """Synthetic voiced speech: a pulse train at a gliding 120 Hz pitch through three formants
    of /a/, in two syllables per second. Silero's wrapper scores it 0.6-0.99 (measured)."""
    t = np.arange(n) / SR
    phase = np.cumsum((120 + 20 * np.sin(2 * np.pi * 1.5 * t)) / SR)
    x = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    for freq, bw in ((700, 80), (1220, 90), (2600, 120)):
        x = _resonate(x, freq, bw)
    x *= np.sqrt(np.clip(np.sin(2 * np.pi * 2 * t), 0, None))
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.5 * x / np.abs(x).max() + 0.003 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def silero(tmp_path_factory):
    d = tmp_path_factory.mktemp("silero")
    path = d / "silero_vad.onnx"
    shutil.copy(silero_file(), path)
    return path


def serve(model_dir):
    log = (model_dir / "server.log").open("w")
    proc = subprocess.Popen(
        [*SERVE, "--model-dir", str(model_dir), "--port", "0", "--grace", "1"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    return proc, log


def stop(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def streamed(model_dir, audio: np.ndarray) -> np.ndarray:
    """``rnnzoo serve`` on ``model_dir``, one session, 512-sample chunks: one output each."""
    proc, log = serve(model_dir)
    try:
        target = _wait_listening(proc)
        with Client(target, timeout=30) as c, c.session("silero_vad") as s:
            outs = [s.step(audio[i : i + N]) for i in range(0, len(audio), N)]
    finally:
        stop(proc, log)
    assert [o.steps_total for o in outs] == list(range(N, len(audio) + 1, N))
    return np.array([float(np.asarray(o["output"]).reshape(-1)[0]) for o in outs])


def ort_direct(path, audio: np.ndarray, context: int = 0) -> np.ndarray:
    """The file run by ONNX Runtime, chunk by chunk with the state carried (and the last
    ``context`` samples of the previous chunk in front, zeros before the first)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    padded = np.concatenate([np.zeros(context, np.float32), audio])
    probs = []
    for i in range(0, len(audio), N):
        x = padded[i : i + context + N][None]
        out, state = sess.run(None, {"input": x, "state": state, "sr": np.array(SR)})
        probs.append(float(out[0, 0]))
    return np.array(probs)


def test_init_and_sr_are_all_silero_needs_to_pass_check_and_stream(silero, capsys):
    assert main(["contract", "init", str(silero)]) == 0
    printed = capsys.readouterr().out
    assert "state state -> stateN" in printed and "set the value of 'sr'" in printed
    side = sidecar_path(silero)
    data = json.loads(side.read_text())
    # what the probe run settled, where the graph's declared dims say nothing
    assert data["states"] == [
        {
            "input": "state",
            "output": "stateN",
            "dtype": "float32",
            "shape": [2, "batch", 128],
            "batch_axis": 1,
            "init": "zeros",
        }
    ]
    assert [(i["name"], i["batch_axis"], i["time_axis"]) for i in data["inputs"]] == [
        ("input", 0, 1)
    ]
    assert [(o["name"], o["batch_axis"], o["time_axis"]) for o in data["outputs"]] == [
        ("output", 0, None)
    ]
    assert data["chunk"] == {"steps": N}
    assert data["constants"] == [{"name": "sr", "dtype": "int64", "value": None}]
    assert main(["contract", "check", str(silero)]) == 1  # refused until sr is set
    assert "constants[0].value: not set" in capsys.readouterr().out

    data["constants"][0]["value"] = SR  # the one thing the user sets
    side.write_text(json.dumps(data, indent=2))
    assert main(["contract", "check", str(silero)]) == 0, capsys.readouterr().out

    audio = vowels(12 * N)
    got = streamed(silero.parent, audio)
    want = ort_direct(silero, audio)
    np.testing.assert_allclose(got, want, atol=TOL)


def test_with_the_context_silero_keeps_the_server_streams_as_its_own_wrapper(silero):
    main(["contract", "init", str(silero), "--force", "--set", f"sr={SR}"])
    side = sidecar_path(silero)
    data = json.loads(side.read_text())
    assert data["constants"][0]["value"] == SR
    data["inputs"][0]["context_steps"] = K  # the 64 samples OnnxWrapper prepends at 16 kHz
    side.write_text(json.dumps(data, indent=2))
    assert main(["contract", "check", str(silero)]) == 0

    audio = vowels(10 * N, seed=3)
    got = streamed(silero.parent, audio)
    np.testing.assert_allclose(got, ort_direct(silero, audio, context=K), atol=TOL)
    # silero-vad's own OnnxWrapper on the same chunks, in the gallery venv
    code = (
        "import sys, numpy as np, torch\n"
        "from silero_vad import load_silero_vad\n"
        "m = load_silero_vad(onnx=True)\n"
        "x = torch.from_numpy(np.load(sys.argv[1]))\n"
        f"print([float(m(x[i:i + {N}], {SR})) for i in range(0, len(x), {N})])\n"
    )
    np.save(silero.parent / "audio.npy", audio)
    r = subprocess.run(
        [str(gallery_python()), "-c", code, str(silero.parent / "audio.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    wrapper = np.array(json.loads(r.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, wrapper, atol=TOL)
    # with the context Silero scores the vowels as speech; without it, not (docs/contract.md)
    assert got.max() > 0.5


def test_every_graph_in_the_silero_package_gets_a_sidecar_that_passes_or_says_why_not(
    tmp_path, capsys
):
    """The package ships six graphs, exported by different tools and opsets: their dims are
    unnamed, named by the exporter (``AddstateN_dim_0``), or fixed at batch 1."""
    data_dir = silero_file().parent
    files = sorted(p.name for p in data_dir.glob("*.onnx"))
    assert len(files) == 6, files
    fixed_batch = {"silero_vad_16k_sequence.onnx", "silero_vad_openvino_16k.onnx"}
    for name in files:
        path = tmp_path / name
        shutil.copy(data_dir / name, path)
        assert main(["contract", "init", str(path)]) == 0, name
        printed = capsys.readouterr().out
        side = sidecar_path(path)
        data = json.loads(side.read_text())
        if name in fixed_batch:
            assert "exported for one fixed batch size" in printed, (name, printed)
            continue
        assert [(s["input"], s["output"], s["batch_axis"]) for s in data["states"]] == [
            ("state", "stateN", 1)
        ], name
        for const in data["constants"]:
            const["value"] = SR
        side.write_text(json.dumps(data))
        assert main(["contract", "check", str(path)]) == 0, (name, capsys.readouterr().out)
