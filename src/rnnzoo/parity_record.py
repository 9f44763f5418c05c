"""The parity record: what ``rnnzoo verify`` concluded about an exported model, kept beside it.

``DIR/NAME.parity.json``, where ``NAME`` is the model's name (a seq2seq pair's group name) and
``DIR`` holds its ``.onnx`` file(s). Written by the zoo build and ``rnnzoo export``; read by the
model repository (``rnnzoo serve``), which refuses a model whose record says parity failed.
No torch, no onnx: the serving install reads it.

A record judges exact files: ``files`` maps each graph's file name to the sha256 of the bytes
that were verified. A record whose hashes do not match the file beside it judged some other
file, so it says nothing about this one (see ``check``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "rnnzoo.parity/1"
SUFFIX = ".parity.json"


def record_path(onnx_dir: str | Path, name: str) -> Path:
    """``DIR/NAME.parity.json``."""
    return Path(onnx_dir) / f"{name}{SUFFIX}"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_record(
    name: str,
    *,
    ok: bool,
    summary: str,
    files: list[Path],
    location: str = ".",
    checkpoint_sha256: str | None = None,
    config_hash: str | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A record for ``files`` (hashed now). ``location``: where the judged files are, relative
    to the record's folder ("." = served beside it, ".staging" = quarantined)."""
    return {
        "format": FORMAT,
        "name": name,
        "ok": bool(ok),
        "summary": summary,
        "files": {Path(p).name: sha256_file(p) for p in files},
        "location": location,
        "checkpoint_sha256": checkpoint_sha256,
        "config_hash": config_hash,
        "report": report,
    }


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write atomically (temp file, then rename): a reader never sees half a record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, sort_keys=True, default=float)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record, or None when it is absent, unreadable or not a ``FORMAT`` record."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    if not isinstance(data.get("files"), dict) or not isinstance(data.get("ok"), bool):
        return None
    return data


@dataclass(frozen=True)
class Verdict:
    """What a file's parity record says about it.

    ``status``: "none" (no record: an external model, loads as before), "ok" (the record
    judged these exact bytes and parity held), "failed" (it judged these bytes and parity
    failed), "untrusted" (a record is there but judged other bytes, or is unreadable: the
    file beside it is unverified).
    """

    status: str
    record: Path
    message: str = ""

    @property
    def servable(self) -> bool:
        return self.status in ("none", "ok")


def check(onnx_path: str | Path, name: str) -> Verdict:
    """Judge ``onnx_path`` by the record ``NAME.parity.json`` beside it."""
    onnx_path = Path(onnx_path)
    path = record_path(onnx_path.parent, name)
    if not path.exists():
        return Verdict("none", path)
    fix = (
        f"rebuild it with `rnnzoo zoo build --only {name}` (or `rnnzoo export CHECKPOINT --out "
        f"{onnx_path.parent}`), which verifies before it writes a servable file"
    )
    record = read_record(path)
    if record is None:
        return Verdict(
            "untrusted",
            path,
            f"{onnx_path}: its parity record {path} is unreadable or not an {FORMAT} record "
            f"(older rnnzoo?), so this file is unverified; {fix}",
        )
    want = record["files"].get(onnx_path.name)
    if want is None or want != sha256_file(onnx_path):
        judged = ", ".join(f"{k} ({str(v)[:12]}...)" for k, v in record["files"].items())
        return Verdict(
            "untrusted",
            path,
            f"{onnx_path}: its parity record {path} judged other bytes ({judged or 'no files'}), "
            f"not this file, so this file is unverified; {fix}",
        )
    if not record["ok"]:
        first = str(record.get("summary") or "").strip().splitlines()[:3]
        return Verdict(
            "failed",
            path,
            f"{onnx_path}: its parity record {path} says ONNX Runtime does not match PyTorch "
            f"({'; '.join(first) or 'no summary'}); {fix}",
        )
    return Verdict("ok", path)
