"""How state keys are named: a short id of a route, a short digest of what a request sent.

Raw paths and request-supplied values (idempotency keys, cache keys, token ids) never
appear in Valkey key names; these digests stand in for them.
"""

from __future__ import annotations

import functools
import hashlib


@functools.lru_cache(maxsize=4096)
def route_id(route: str) -> str:
    """A short stable id of a route for key names (no spaces, no user input)."""
    return hashlib.sha256(route.encode()).hexdigest()[:12]


def digest(value: str | bytes) -> str:
    """A short digest of a request-supplied value, so raw keys never appear in Valkey."""
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return hashlib.sha256(raw).hexdigest()[:32]


@functools.lru_cache(maxsize=8192)
def path_digest(path: str) -> str:
    """`digest` of a request path, remembered: a route's callers ask for few paths."""
    return digest(path)
