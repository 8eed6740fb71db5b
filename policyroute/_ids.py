"""Ids unique across processes and forks: a random per-process prefix and a counter."""

from __future__ import annotations

import itertools
import os
import secrets
from typing import Final


class UniqueIds:
    """32 hex digits: 20 random per process (renewed in a forked child), 12 of a counter."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        """A fresh prefix (a forked child must not repeat its parent's ids)."""
        self.prefix = secrets.token_hex(10)
        # The prefix and the counter as one integer: an id is its 16 bytes in hex, made by
        # two C calls (a format spec such as `012x` costs several times as much, per id).
        # The counter's 48 bits last 2**48 ids a process.
        self.counter = itertools.count((int(self.prefix, 16) << 48) + 1)

    def next(self) -> str:
        """The next id."""
        return next(self.counter).to_bytes(16, "big").hex()


# Request ids, and the tokens that own concurrency slots, stampede locks and reservations.
IDS: Final = UniqueIds()
