"""Ids unique across processes and forks: a random per-process prefix and a counter."""

from __future__ import annotations

import itertools
import os
import secrets
from typing import Final

# Ids are made a block at a time: one hex conversion for the block, then one slice an id
# (two calls an id, its integer and bytes made one by one, cost several times as much).
BLOCK: Final = 256
_LOW: Final = [bytes((i,)) for i in range(BLOCK)]


class UniqueIds:
    """32 hex digits: 20 random per process (renewed in a forked child), 12 of a counter."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        """A fresh prefix (a forked child must not repeat its parent's ids)."""
        self.prefix = secrets.token_hex(10)
        self._head = bytes.fromhex(self.prefix)
        # The counter's 48 bits (2**48 ids a process): its top 40 number the block, taken
        # once each (`next` on a count is atomic), its low 8 the id in the block.
        self._blocks = itertools.count()
        # Ids of the current block not yet handed out, the next one last.
        self._ready: list[str] = []

    def next(self) -> str:
        """The next id."""
        ready = self._ready
        if ready:
            try:
                return ready.pop()  # atomic: threads popping one list never share an id
            except IndexError:
                pass  # another thread took the last one meanwhile
        return self._refill()

    def _refill(self) -> str:
        """Make the next block of ids; hand out its first."""
        block = next(self._blocks)
        head = self._head + block.to_bytes(5, "big")
        text = b"".join([head + low for low in _LOW]).hex()
        ids = [text[i : i + 32] for i in range(len(text) - 32, -1, -32)]  # last id first
        if block == 0:
            ids.pop()  # the counter starts at 1
        first = ids.pop()
        # Replaced whole: a thread refilling at the same time takes a block of its own, and
        # the ids of the block it replaces are skipped, never repeated.
        self._ready = ids
        return first


# Request ids, and the tokens that own concurrency slots, stampede locks and reservations.
IDS: Final = UniqueIds()
