"""Warnings a backend outage repeats on every request, logged once an interval with a count.

A Valkey outage makes every request of a route that fails open (or closed) say the same
thing; one line each is hundreds of lines a second. Here the first occurrence of a
route and cause is logged at once; the ones after it in the next `interval` seconds are
counted, and one line at the end of the interval says how many there were (and the
latest text). The metrics count every occurrence (`policyroute_backend_errors_total`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..errors import StorageError

INTERVAL = 10.0  # seconds between two lines of one route and cause
_MAX_KEYS = 4096  # routes x causes remembered; past this, forgotten and started again

log = logging.getLogger("policyroute")


class _Seen:
    """One route and cause: when its last line was logged, and what came since."""

    __slots__ = ("count", "logger", "since", "text", "timer")

    def __init__(self, since: float, text: str, logger: logging.Logger) -> None:
        self.since = since
        self.logger = logger
        self.count = 0  # occurrences since the last line, not logged yet
        self.text = text
        self.timer: asyncio.TimerHandle | None = None


class Repeats:
    """At most one line per route and cause per interval; each says how many it stands for."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.seen: dict[tuple[str, str], _Seen] = {}

    def warning(
        self, route: str, cause: str, text: str, logger: logging.Logger | None = None
    ) -> None:
        """Log `text` for `route` now, or count it for the next line of its route and cause."""
        key = (route, cause)
        now = self.clock()
        seen = self.seen.get(key)
        if seen is None or (not seen.count and now - seen.since >= self.interval):
            if seen is None and len(self.seen) >= _MAX_KEYS:
                self._forget()
            out = logger or self.logger
            self.seen[key] = _Seen(now, text, out)
            out.warning(
                "policyroute: %s: %s (repeats on this route are logged every %gs, counted)",
                route,
                text,
                self.interval,
                extra={"route": route, "repeats": 1},
            )
            return
        seen.count += 1
        seen.text = text
        if now - seen.since >= self.interval:
            self._flush(key, seen)  # a timer that could not run (no loop): now, then
        elif seen.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop to wake us: the next occurrence after the interval logs
            seen.timer = loop.call_later(seen.since + self.interval - now, self._flush, key, seen)

    def _flush(self, key: tuple[str, str], seen: _Seen) -> None:
        """The line for what was counted since the last one."""
        seen.timer = None
        if self.seen.get(key) is not seen or not seen.count:
            return
        now = self.clock()
        count, seen.count = seen.count, 0
        elapsed, seen.since = now - seen.since, now
        seen.logger.warning(
            "policyroute: %s: %s (%d %s on this route in the last %.1fs)",
            key[0],
            seen.text,
            count,
            "time" if count == 1 else "times",
            elapsed,
            extra={"route": key[0], "repeats": count},
        )

    def flush(self) -> None:
        """Log every count not logged yet (at shutdown, or in tests)."""
        for key, seen in list(self.seen.items()):
            if seen.timer is not None:
                seen.timer.cancel()
            self._flush(key, seen)

    def _forget(self) -> None:
        self.flush()
        self.seen.clear()


BACKEND = Repeats(log)


def backend_warning(
    route: str, exc: StorageError, what: str = "", logger: logging.Logger | None = None
) -> None:
    """Say that a backend failed on `route`, at most once an interval per cause."""
    # The cause is what failed and how the step went on; the text shows the latest error.
    cause = f"{what}{exc.backend}:{exc.operation}:{'open' if exc.fail_open else 'closed'}"
    BACKEND.warning(route, cause, f"{what}{exc}", logger)
