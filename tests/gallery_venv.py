"""The gallery venv, ``.venv-gallery`` (``scripts/setup-gallery.sh``): published libraries
beside torch 2.13.0 and this checkout's rnnzoo. ``scripts/test.sh`` makes it first; a test that
needs it makes it when it is missing. Nothing skips: without it the test fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GALLERY_PY = ROOT / ".venv-gallery" / "bin" / "python"


def gallery_python() -> Path:
    if not GALLERY_PY.exists():
        r = subprocess.run(
            ["bash", str(ROOT / "scripts" / "setup-gallery.sh")],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert r.returncode == 0, f"scripts/setup-gallery.sh failed:\n{r.stderr[-3000:]}"
    return GALLERY_PY


def silero_file(name: str = "silero_vad.onnx") -> Path:
    """A graph shipped in the silero-vad PyPI package (installed in the gallery venv)."""
    code = f"import importlib.resources as r; print(r.files('silero_vad.data').joinpath({name!r}))"
    r = subprocess.run(
        [str(gallery_python()), "-c", code], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return Path(r.stdout.strip())
