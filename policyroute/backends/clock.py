"""Valkey's clock, read in the worker: the state script's `now` without a `TIME` per call.

Every stateful check measures time on Valkey's clock, so all workers agree whatever
their own clocks say. Asking for it inside the script (`redis.call('TIME')`) costs the
server about a seventh of a one-bucket request. Instead, the worker samples `TIME` every
few seconds and reads Valkey's time off its own monotonic clock in between:

- a sample sent at local time t0 and answered at t1 was read by the server at some point
  between, so `offset = server - (t0 + t1) / 2` is right within `(t1 - t0) / 2`, its error;
- the estimate is the sample with the least error among the last `WINDOW` (NTP's clock
  filter): a sample delayed behind a busy write does not move it;
- a sample that disagrees with the estimate by more than both errors together means a
  clock was stepped: it replaces the estimate at once;
- until the first sample, when the estimate's error is over `MAX_ERROR_MS`, or when no
  sample has succeeded for `STALE` seconds, `now` is `""` and the script asks the server
  itself (`TIME`), as every call did before.

So Valkey's time as the scripts see it is off by at most the best recent sample's error
(a fraction of a millisecond on a LAN) plus the monotonic clock's drift over `WINDOW`
samples; `state.lua` keeps a token bucket's stamp from going back, so a worker's `now`
slightly behind another's never refills a bucket twice.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

# Seconds between samples, samples the estimate is chosen from, seconds without a
# successful sample after which the scripts ask the server again, and the largest error
# (ms) an estimate may have to be used.
EVERY: Final = 5.0
WINDOW = 4
STALE: Final = 30.0
MAX_ERROR_MS: Final = 20.0

ASK_SERVER: Final = ""  # the `now` argument that makes a script read `TIME` itself


class ServerClock:
    """Valkey's time in ms, estimated from `TIME` samples and this process's monotonic clock."""

    __slots__ = ("_ask", "_best", "_due", "_samples", "_sampling", "_sent", "_tick")

    def __init__(self, ask: Callable[[], asyncio.Future[Any]]) -> None:
        # Sends TIME and returns the future of its reply ([seconds, microseconds]): a sample
        # is a callback on it, so sampling starts no task on any request.
        self._ask = ask
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=WINDOW)
        self._best: tuple[float, float, float] | None = None  # (offset ms, error ms, at)
        self._due = -math.inf  # monotonic time of the next sample
        self._sampling: asyncio.Future[Any] | None = None
        self._sent = -math.inf  # when the sample in flight was asked for
        self._tick = time.monotonic

    def now(self) -> int | str:
        """Valkey's time in ms, or `ASK_SERVER` when there is no estimate fit to use."""
        at = self._tick()
        if at >= self._due:
            self._sample(at)
        best = self._best
        if best is None or at - best[2] > STALE:
            return ASK_SERVER
        return int(at * 1000.0 + best[0])

    def _sample(self, at: float) -> None:
        # One sample at a time; one still unanswered after STALE seconds, or asked on
        # another event loop (its reply may never come), does not hold back the next.
        self._due = at + EVERY
        running = self._sampling
        if running is not None and not running.done():
            try:
                here = running.get_loop() is asyncio.get_running_loop()
            except RuntimeError:
                return
            if here and at - self._sent < STALE:
                return
        try:
            future = self._ask()
        except Exception:  # no running loop, a closed store: the scripts ask the server
            return
        self._sampling, self._sent = future, at
        future.add_done_callback(functools.partial(self._heard, at))

    def _heard(self, sent: float, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # no sample: the estimate ages, then the scripts ask the server
        heard = self._tick()
        seconds, micros = future.result()
        server_ms = int(seconds) * 1000.0 + int(micros) / 1000.0
        # The server read its clock after `sent` and before `heard`: halfway is right
        # within half the round trip (the callback's own delay only widens the bound).
        self.add(server_ms - (sent + heard) * 500.0, (heard - sent) * 500.0, heard)

    def add(self, offset: float, error: float, at: float) -> None:
        """Fold one sample (offset and error in ms, taken at monotonic `at`) into the estimate."""
        best = self._best
        if best is not None and abs(offset - best[0]) > error + best[1]:
            self._samples.clear()  # a clock was stepped: what was sampled before is wrong
        self._samples.append((offset, error, at))
        chosen = min(self._samples, key=lambda s: s[1])
        if chosen[1] > MAX_ERROR_MS:
            self._best = None
            return
        # The chosen sample's offset, fresh as of now: it stays good while samples succeed.
        self._best = (chosen[0], chosen[1], at)

    @property
    def error(self) -> float | None:
        """The estimate's error bound in ms (None: no estimate)."""
        return None if self._best is None else self._best[1]
