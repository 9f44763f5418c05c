"""`rnnzoo serve / stream / generate` as real processes talking over loopback."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from onnx_fixtures import build_zoo

from rnnzoo.client_cli import signal_wave

CLI = [sys.executable, "-m", "rnnzoo.cli"]


def _wait_listening(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.startswith("listening on "):
                return line.split()[-1]
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stderr.read()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    build_zoo(d)
    proc = subprocess.Popen(
        [*CLI, "serve", "--model-dir", str(d), "--port", "0", "--grace", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    target = _wait_listening(proc)
    yield proc, target
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_serve_stream_generate_then_sigterm(server, tmp_path):
    proc, target = server
    assert target.startswith("127.0.0.1:") and int(target.split(":")[1]) > 0
    plot = tmp_path / "stream.png"
    r = _run(
        "stream",
        "--model",
        "lstm2",
        "--target",
        target,
        "--steps",
        "20",
        "--chunk",
        "3",
        "--plot",
        str(plot),
    )
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("t=")]
    assert [int(ln.split()[0][2:]) for ln in lines] == list(range(20))
    assert plot.stat().st_size > 1000
    r = _run("stream", "--model", "bigru", "--target", target, "--steps", "7", "--chunk", "2")
    assert r.returncode == 0, r.stderr
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("t=")]) == 7
    r = _run(
        "generate",
        "--model",
        "charlm",
        "--prompt",
        "abc",
        "--target",
        target,
        "--max-tokens",
        "10",
        "--seed",
        "1",
    )
    assert r.returncode == 0 and r.stdout.startswith("abc") and 4 <= len(r.stdout.strip()) <= 13
    r = _run("stream", "--model", "nope", "--target", target)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "lstm2" in r.stderr
    r = _run("stream", "--model", "charlm", "--target", target)
    assert r.returncode == 2 and "does not take one float signal" in r.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    logs = [json.loads(ln) for ln in proc.stderr.read().splitlines() if ln.strip()]
    msgs = [e["msg"] for e in logs]
    assert "serving" in msgs and msgs[-2:] == ["stopping", "stopped"]
    rpcs = [e for e in logs if e["msg"] == "rpc"]
    assert {"Stream", "GetModel", "Generate"} <= {e["rpc"] for e in rpcs}
    assert all({"code", "ms"} <= set(e) for e in rpcs)
    assert any(
        e["code"] == "NOT_FOUND" and e.get("model") == "nope" and e["level"] == "warning"
        for e in rpcs
    )
    # a successful unary call is routine: logged at debug, so not at the default info level
    assert not [e for e in rpcs if e["rpc"] == "CreateSession" and e["code"] == "OK"]


def test_serve_reports_a_missing_model_dir(tmp_path):
    r = _run("serve", "--model-dir", str(tmp_path / "none"), "--port", "0")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_bad_options_are_user_errors(tmp_path):
    r = _run("serve", "--model-dir", str(tmp_path), "--port", "70000")
    assert r.returncode == 2 and "port must be in" in r.stderr
    r = _run("stream", "--model", "x", "--steps", "0")
    assert r.returncode == 2 and "--steps" in r.stderr


def test_signal_wave_is_deterministic():
    a = signal_wave(50, 3, seed=1)
    assert a.shape == (50, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, signal_wave(50, 3, seed=1))
    assert not np.allclose(a[:, 0], a[:, 1])  # features are phase-shifted


def test_serving_path_never_imports_torch():
    code = (
        "import sys, rnnzoo.client, rnnzoo.client_cli, rnnzoo.server.transport, rnnzoo.server.cli, rnnzoo.cli;"
        "rnnzoo.cli._build_parser('serve');"
        "bad = sorted(m for m in sys.modules if m.startswith(('torch', 'rnnzoo.models')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_serve_refuses_a_failed_parity_record_unless_allowed(tmp_path):
    from onnx_fixtures import build_rnn

    from rnnzoo import parity_record

    build_rnn(tmp_path / "m.onnx", name="m")
    rec = parity_record.make_record(
        "m", ok=False, summary="FAIL m whole B=1 T=1000 hn", files=[tmp_path / "m.onnx"]
    )
    parity_record.write_record(tmp_path / "m.parity.json", rec)
    r = _run("serve", "--model-dir", str(tmp_path), "--port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "m.parity.json" in r.stderr and "--allow-failed-parity" in r.stderr
    proc = subprocess.Popen(
        [*CLI, "serve", "--model-dir", str(tmp_path), "--port", "0", "--allow-failed-parity"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        from rnnzoo.client import Client

        with Client(_wait_listening(proc)) as client:
            client.wait_ready(30)  # SERVING: the models are loaded
            assert [m.name for m in client.models()] == ["m"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        logs = [json.loads(ln) for ln in proc.stderr.read().splitlines() if ln.strip()]
        warned = [e for e in logs if e.get("level") in ("WARNING", "warning")]
        assert any("m.parity.json" in e["msg"] for e in warned), logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
