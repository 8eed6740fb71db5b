"""Verified bearer tokens, remembered until they expire: looked up on every request."""

from __future__ import annotations

import time
from collections.abc import Sequence

from joserfc.jwk import Key

from ..principal import Principal


class TokenCache:
    """Verified tokens until their `exp`, at most `size` of them (the oldest out first).

    A plain dict: a repeat token is one lookup and one clock read on every request.
    Each entry remembers the key that verified it, so a key leaving its JWKS takes its
    tokens out (`forget`). Tokens without `exp` are not kept.
    """

    __slots__ = ("entries", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[str | bytes, tuple[Principal, Key]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, token: str | bytes) -> Principal | None:
        """The principal of `token` while it has not expired."""
        entry = self.entries.get(token)
        if entry is None:
            return None
        principal = entry[0]
        if (principal.expires_at or 0.0) > time.time():
            return principal
        self.entries.pop(token, None)
        return None

    def put(self, token: str | bytes, principal: Principal, key: Key) -> None:
        """Keep `principal` until its token expires; when full, the oldest entry leaves."""
        if not principal.expires_at or principal.expires_at <= time.time():
            return
        entries = self.entries
        while token not in entries and len(entries) >= self.size:
            del entries[next(iter(entries))]  # the oldest (an expired one is dropped on read)
        entries[token] = (principal, key)

    def forget(self, keys: Sequence[Key]) -> None:
        """Drop every token verified with one of `keys` (they left their issuer's JWKS)."""
        gone = {id(k) for k in keys}
        entries = self.entries
        for token in [t for t, (_, key) in entries.items() if id(key) in gone]:
            del entries[token]
