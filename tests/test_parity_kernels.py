"""Another machine in the suite: the trained (quick) zoo passes parity under a second set of
CPU float kernels, so a rule tuned to one machine's kernels fails here, not at a user's.

The second selection forces torch's portable kernels: ``ATEN_CPU_CAPABILITY=default`` (no
AVX2/AVX-512 vectorised tanh/sigmoid), ``ONEDNN_MAX_CPU_ISA=SSE41`` and
``MKL_CBWR=COMPATIBLE`` (MKL's reproducible, non-vectorised code path). ONNX Runtime has no
such switch: its MLAS kernels are chosen from CPUID alone, so its side stays the host's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rnnzoo.export.cli import export_checkpoint
from rnnzoo.models.build import build_zoo

SECOND_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_CBWR": "COMPATIBLE",
}
# A reduced grid: per-step from each T, whole and chunked up to T=1000 (the num2words
# encoder's failing case on an AMD host was whole B=1 T=1000).
VERIFY = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from rnnzoo.export.verify import verify_file
    out = {"capability": torch.backends.cpu.get_cpu_capability(), "models": {}}
    for path in sys.argv[1:]:
        report, _ = verify_file(path, times=(1, 7, 64, 1000), batches=(1, 3), stream=(1000, 3))
        out["models"][path] = {"ok": report.ok, "summary": report.summary()}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def trained_zoo(tmp_path_factory):
    """Every zoo entry, trained with its quick settings, exported (one file per model)."""
    out = tmp_path_factory.mktemp("zoo")
    results = build_zoo(out, quick=True, log=lambda m: None)
    files = []
    for r in results:
        ckpt = out / r["name"] / "model.pt"
        files.append(export_checkpoint(ckpt)[0])  # seq2seq: the encoder; verify adds its pair
    return files


def _verify(files, extra_env: dict[str, str]) -> dict:
    env = {**os.environ, **extra_env}
    proc = subprocess.run(
        [sys.executable, "-c", VERIFY, *map(str, files)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_trained_zoo_passes_parity_on_the_hosts_kernels_and_on_portable_ones(trained_zoo):
    assert len(trained_zoo) >= 12  # every entry of the zoo
    host = _verify(trained_zoo, {})
    portable = _verify(trained_zoo, SECOND_KERNELS)
    assert portable["capability"] == "DEFAULT"
    for run in (host, portable):
        bad = {p: m["summary"] for p, m in run["models"].items() if not m["ok"]}
        assert not bad, f"kernels {run['capability']}: " + "\n".join(
            f"{p}:\n{s}" for p, s in bad.items()
        )
