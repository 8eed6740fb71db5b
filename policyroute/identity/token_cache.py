"""Verified bearer tokens, remembered until they expire: looked up on every request."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

from joserfc.jwk import Key

from ..principal import Principal

# An entry is found by the token's last characters (its signature's: no two tokens a
# server verified share them, short of a forgery) and then compared whole. Hashing the
# whole token, as a dict keyed by it does on every request, costs more than the rest of
# the lookup: a JWT is 300-1,000 bytes, and the server hands us a new bytes object each time.
TAIL: Final = 32


class TokenCache:
    """Verified tokens until their `exp`, at most `size` of them (the oldest out first).

    A plain dict: a repeat token is one lookup, one comparison and one clock read on every
    request. Each entry remembers the key that verified it, so a key leaving its JWKS
    takes its tokens out (`forget`). Tokens without `exp` are not kept. Two tokens that
    end alike share a place (the later one verified takes it): the comparison keeps one
    from ever being answered with the other's principal.
    """

    __slots__ = ("entries", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[str | bytes, tuple[str | bytes, Principal, Key]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, token: str | bytes) -> Principal | None:
        """The principal of `token` while it has not expired."""
        place = token[-TAIL:]
        entry = self.entries.get(place)
        if entry is None or entry[0] != token:
            return None
        principal = entry[1]
        if (principal.expires_at or 0.0) > time.time():
            return principal
        self.entries.pop(place, None)
        return None

    def put(self, token: str | bytes, principal: Principal, key: Key) -> None:
        """Keep `principal` until its token expires; when full, the oldest entry leaves."""
        if not principal.expires_at or principal.expires_at <= time.time():
            return
        entries = self.entries
        place = token[-TAIL:]
        while place not in entries and len(entries) >= self.size:
            del entries[next(iter(entries))]  # the oldest (an expired one is dropped on read)
        entries[place] = (token, principal, key)

    def forget(self, keys: Sequence[Key]) -> None:
        """Drop every token verified with one of `keys` (they left their issuer's JWKS)."""
        gone = {id(k) for k in keys}
        entries = self.entries
        for place in [p for p, (_, _, key) in entries.items() if id(key) in gone]:
            del entries[place]
