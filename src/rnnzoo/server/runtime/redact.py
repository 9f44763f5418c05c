"""What of a client's strings and secrets may appear in logs and error messages.

- session ids are bearer secrets (whoever has one can drive the session): logs and errors show
  only ``sid_tag``, a short prefix that identifies a session to its owner but is far too
  short to use;
- strings a client sent (model names, characters, ids) are echoed at most ``CLIP`` characters.
"""

from __future__ import annotations

CLIP = 64
TAG = 6  # characters of a session id shown: 36 of its 192 bits


def clip(text: str, limit: int = CLIP) -> str:
    """A client string as echoed back: at most ``limit`` characters, then "…"."""
    return text if len(text) <= limit else text[:limit] + "…"


def sid_short(sid: str) -> str:
    """A session id as logs show it: its first characters."""
    return sid[:TAG] + "…" if len(sid) > TAG else sid


def sid_tag(sid: str) -> str:
    """A session id as error messages show it: ``sid_short``, quoted."""
    return repr(sid_short(sid))
