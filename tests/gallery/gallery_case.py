"""One gallery configuration: a published library's module, built as its users build it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# what a configuration must do
STREAMS = "streams"  # exports, verifies, and ORT in random chunks equals the whole (<= 1e-5)
EXPORTS = "exports"  # exports and verifies, not streamable; the reason contains `why`
REFUSED = "refused"  # InvalidArgument whose message matches the regex `why`


@dataclass(frozen=True)
class Case:
    library: str
    name: str
    build: Callable[[], tuple[Any, tuple]]  # () -> (module in eval mode, example inputs)
    expect: str = STREAMS
    why: str = ""
    kwargs: dict = field(default_factory=dict)  # export_module keywords (axes=...)
    # the exporter still fails it: (GALLERY_FAILURES entry, what it does today); the test
    # marks such a case xfail(strict=True), so a fix shows up as XPASS to be recorded
    known_failure: str = ""
