"""How state keys are named: a short id of a route, a short digest of what a request sent.

Raw paths and request-supplied values (idempotency keys, cache keys, token ids) never
appear in Valkey key names; these digests stand in for them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Callable
from typing import Final, Generic, Protocol, TypeVar


class _Hash(Protocol):
    def hexdigest(self) -> str: ...


def _sha256_maker() -> Callable[[bytes], _Hash]:
    """Python's own SHA-256 where it has one: the same digests, without the OpenSSL
    context that `hashlib.sha256` copies to finish every digest (a quarter of the cost of
    a short one)."""
    for module in ("_sha2", "_sha256"):  # 3.12+, 3.11
        try:
            maker: Callable[[bytes], _Hash] = importlib.import_module(module).sha256
        except (ImportError, AttributeError):
            continue
        return maker
    return hashlib.sha256


_sha256: Final = _sha256_maker()  # per request: bound once


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


T = TypeVar("T")

# Tags a `TagMemo` keeps at most (then it starts again), and the longest tag it keeps.
TAG_MEMO: Final = 16_384
TAG_MEMO_LONGEST: Final = 256


class TagMemo(Generic[T]):
    """What one call site makes from a hash tag (its keys), remembered for the tag's next
    requests: one dict lookup instead of a key built, or looked up by all its parts.

    Bounded like the store's key memo: past TAG_MEMO tags it starts again, and a tag longer
    than TAG_MEMO_LONGEST is made every time, so callers cannot make it hold megabytes.
    """

    __slots__ = ("_bound", "_made", "_make")

    def __init__(self, make: Callable[[str], T], bound: int = TAG_MEMO) -> None:
        self._make = make
        self._bound = bound
        self._made: dict[str, T] = {}

    def __len__(self) -> int:
        return len(self._made)

    def get(self, tag: str) -> T:
        """`make(tag)`, remembered."""
        made = self._made.get(tag)
        if made is None:
            made = self.put(tag, self._make(tag))
        return made

    def put(self, tag: str, made: T) -> T:
        """Remember `made` for `tag` in place of what was (one store: threads see either)."""
        if len(tag) <= TAG_MEMO_LONGEST:
            if len(self._made) >= self._bound:
                self._made.clear()
            self._made[tag] = made
        return made
