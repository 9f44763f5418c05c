"""Triton's own perf_analyzer, unmodified, against a real ``rnnzoo serve`` on loopback.

perf_analyzer 2.60 comes from PyPI's manylinux_2_38 wheel and runs under Debian 13's loader and
C/C++ runtime unpacked into ``.perf-analyzer/`` (``scripts/setup-perf-analyzer.sh``, which
``scripts/test.sh`` runs first; this test runs it too when it is missing). No ``-x``: it must
find the model version from ModelStatistics by itself (the version whose queue count grew),
and its server-side breakdown (queue, compute input/infer/output) must be read, not zero.
Nothing here skips: without perf_analyzer the test fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from onnx_fixtures import build_rnn
from test_server_cli import _wait_listening

ROOT = Path(__file__).resolve().parents[1]
PERF_ANALYZER = ROOT / ".perf-analyzer" / "perf_analyzer"


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    if not PERF_ANALYZER.exists():
        r = subprocess.run(
            ["bash", str(ROOT / "scripts" / "setup-perf-analyzer.sh")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, f"scripts/setup-perf-analyzer.sh failed:\n{r.stderr[-3000:]}"
    return PERF_ANALYZER


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = tmp_path_factory.mktemp("repo")
    (d / "gru" / "1").mkdir(parents=True)
    build_rnn(d / "gru" / "1" / "gru.onnx", cell="gru", seed=3, name="gru")
    log = (d / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnzoo.cli", "serve", "--model-dir", str(d), "--port", "0"],
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


def test_perf_analyzer_runs_without_a_version_flag_and_reads_the_server_side_breakdown(
    perf_analyzer, target
):
    r = subprocess.run(
        [
            str(perf_analyzer),
            "-i",
            "grpc",
            "-u",
            target,
            "-m",
            "gru",
            "--shape",
            "x:1,3",
            "--concurrency-range",
            "2",
            "--measurement-interval",
            "800",
            # a busy machine never looks "stable" (seen at 50 % here, load ~10): the test is
            # about what perf_analyzer reads, not about a stable number
            "--max-trials",
            "3",
            "--stability-percentage",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "failed to find the requested model version" not in out
    server = out[out.index("Server:") :]
    counts = {k: int(v) for k, v in re.findall(r"(Inference|Execution) count: (\d+)", server)}
    assert counts["Inference"] > 0 and 0 < counts["Execution"] <= counts["Inference"], server
    m = re.search(
        r"overhead (\d+) usec \+ queue (\d+) usec \+ compute input (\d+) usec \+ "
        r"compute infer (\d+) usec \+ compute output (\d+) usec",
        server,
    )
    assert m, server
    _, _, c_in, c_infer, c_out = (int(v) for v in m.groups())
    assert c_infer > 0 and c_in + c_out > 0, server
