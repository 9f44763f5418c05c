"""What of a client's strings and secrets may appear in logs and error messages.

- session ids are bearer secrets (whoever has one can drive the session): logs and errors show
  only ``sid_tag``, a short prefix that identifies a session to its owner but is far too
  short to use;
- strings a client sent (model names, characters, ids) are echoed at most ``CLIP`` characters;
- a third party's error texts (the state store's) pass through ``scrub`` first.
"""

from __future__ import annotations

import re

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


# a session id (secrets.token_urlsafe(24): 32 characters) or any other long token-like run
_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,}")


def scrub(text: str, limit: int = 200) -> str:
    """A third party's error text (the state store's) as our messages may carry it: the
    command redis-py quotes is cut ("Command # 1 (EVALSHA ...) of pipeline caused error:"
    carried other clients' full session ids, issue 21), and any run of 20 or more id
    characters is shortened to its first ``TAG``; at most ``limit`` characters."""
    text = re.sub(r"Command # ?\d+ \(.*?\) of pipeline caused error: ?", "", text, flags=re.S)
    text = _TOKEN.sub(lambda m: m.group(0)[:TAG] + "…", text)
    return clip(text, limit)
