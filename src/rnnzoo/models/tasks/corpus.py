"""An offline text corpus every machine has: the Python standard library's own ``.py`` files.

Files are taken in sorted order from the top level of ``sysconfig.get_paths()["stdlib"]``
until the requested size is reached; the SHA-256 of the concatenation is recorded so a card
says exactly which text a model saw (it differs between Python versions).
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from rnnzoo.errors import FailedPrecondition


@dataclass(frozen=True)
class Corpus:
    files: tuple[tuple[str, str], ...]  # (file name, text), sorted by name
    sha256: str
    root: str

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.files)

    def describe(self) -> dict[str, object]:
        return {
            "source": f"{self.root}/*.py (sorted)",
            "files": len(self.files),
            "chars": sum(len(t) for _, t in self.files),
            "sha256": self.sha256,
        }


@functools.lru_cache(maxsize=8)
def stdlib_corpus(min_chars: int, skip_chars: int = 0) -> Corpus:
    """Sorted stdlib ``.py`` files, skipping the first ``skip_chars``, until ``min_chars``.

    Cached: several tasks (and zoo entries) share one read of the files.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[tuple[str, str]] = []
    seen = total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable on this install: the hash records what was used
        text = text.replace("\r\n", "\n")
        if seen < skip_chars:
            seen += len(text)
            continue
        files.append((path.name, text))
        total += len(text)
        if total >= min_chars:
            break
    if total < min_chars:
        raise FailedPrecondition(
            f"the Python standard library at {root} holds only {total} characters of .py "
            f"source after skipping {skip_chars}; the task needs {min_chars} (lower it)"
        )
    digest = hashlib.sha256()
    for name, text in files:
        digest.update(name.encode())
        digest.update(text.encode("utf-8"))
    return Corpus(files=tuple(files), sha256=digest.hexdigest(), root=str(root))
