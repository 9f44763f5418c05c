"""The unmodified ``tritonclient[grpc]`` against a real ``rnnzoo serve`` on loopback.

tritonclient pins protobuf < 7 and rnnzoo's generated code needs >= 7.35, so the client runs
in its own venv, ``.venv-triton``, made by ``scripts/setup-tritonclient.sh`` (which
``scripts/test.sh`` runs first; this test runs it too when the venv is missing). Nothing here
skips: without tritonclient the test fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from onnx_fixtures import build_rnn, build_zoo
from test_server_cli import _wait_listening

ROOT = Path(__file__).resolve().parents[1]
TRITON_PY = ROOT / ".venv-triton" / "bin" / "python"
CHECK = Path(__file__).with_name("tritonclient_check.py")
REPOSITORY = Path(__file__).with_name("tritonclient_repository.py")


@pytest.fixture(scope="module")
def triton_python() -> Path:
    if not TRITON_PY.exists():
        r = subprocess.run(
            ["bash", str(ROOT / "scripts" / "setup-tritonclient.sh")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, f"scripts/setup-tritonclient.sh failed:\n{r.stderr[-3000:]}"
    r = subprocess.run([str(TRITON_PY), "-c", "import tritonclient.grpc"], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return TRITON_PY


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    build_zoo(d)
    # what the README's tritonclient example asks for: one float feature in, "y" out
    build_rnn(d / "sine-rnn.onnx", cell="rnn", input_size=1, output_size=1, seed=21)
    log = (d / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rnnzoo.cli",
            "serve",
            "--model-dir",
            str(d),
            "--port",
            "0",
            "--grace",
            "1",
            "--state-store",  # as scripts/main.sh serves: sessions in an embedded store
            str(d / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        yield _wait_listening(proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _run(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=120)


def test_tritonclient_drives_the_kserve_service(triton_python, target):
    r = _run(triton_python, str(CHECK), target)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "tritonclient: ok" in r.stdout


def test_readme_tritonclient_example_runs(triton_python, target, tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python tritonclient\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1, "the README has one tritonclient example"
    code, n = re.subn(r"^TARGET = .*$", f"TARGET = {target!r}", blocks[0], flags=re.M)
    assert n == 1, "the README's tritonclient example must define TARGET"
    script = tmp_path / "example.py"
    script.write_text(code)
    r = _run(triton_python, str(script))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    match = re.search(r"streamed vs whole: (\S+)", r.stdout)
    assert match and float(match.group(1)) <= 1e-5, r.stdout


@pytest.fixture(scope="module")
def explicit_target(tmp_path_factory):
    """``rnnzoo serve --model-control explicit`` over Triton's layout: m/1/, m/2/."""
    d = tmp_path_factory.mktemp("repo")
    for v in (1, 2):
        (d / "m" / str(v)).mkdir(parents=True)
        build_rnn(d / "m" / str(v) / "m.onnx", cell="gru", seed=v, name="m")
    log = (d / "server.log").open("w")
    args = ["--model-dir", str(d), "--port", "0", "--grace", "1", "--model-control", "explicit"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnzoo.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        yield _wait_listening(proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_tritonclient_loads_and_unloads_models_and_sees_final_responses(
    triton_python, explicit_target
):
    r = _run(triton_python, str(REPOSITORY), explicit_target)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "tritonclient repository: ok" in r.stdout
