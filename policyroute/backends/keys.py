"""How state keys are named: a short id of a route, a short digest of what a request sent.

Raw paths and request-supplied values (idempotency keys, cache keys, token ids) never
appear in Valkey key names; these digests stand in for them.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Final

_sha256: Final = hashlib.sha256  # per request: bound once


@functools.lru_cache(maxsize=4096)
def route_id(route: str) -> str:
    """A short stable id of a route for key names (no spaces, no user input)."""
    return _sha256(route.encode()).hexdigest()[:12]


def digest(value: str | bytes) -> str:
    """A short digest of a request-supplied value, so raw keys never appear in Valkey."""
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return _sha256(raw).hexdigest()[:32]


# Paths longer than this are digested each time: the memo holds only short ones, so a
# stream of long unique paths cannot make it hold megabytes.
PATH_MEMO_LONGEST: Final = 256


def path_digest(path: str) -> str:
    """`digest` of a request path, remembered for short paths (a route's callers repeat them)."""
    if len(path) > PATH_MEMO_LONGEST:
        return digest(path)
    return _short_path_digest(path)


@functools.lru_cache(maxsize=8192)
def _short_path_digest(path: str) -> str:
    return digest(path)
