"""`slow`: warn when a route's handler takes at least this long (e.g. `slow: 500ms`).

The step sits innermost, right around the handler (inside retries, so each attempt is
timed on its own): policy steps such as a Valkey round trip are not counted against the
handler. Each slow run is logged at WARNING on `policyroute` and counted in
`policyroute_slow_handlers_total{route}`; the handler is never interrupted (that is
`timeout`'s job).
"""

from __future__ import annotations

import logging
import time

from ..compile.compiler import Env, register
from ..compile.step import Context, Handler, Step
from ..language.policy import RoutePolicy
from ..observability.metrics import SLOW

log = logging.getLogger("policyroute")


class SlowStep(Step):
    """Time the handler; log and count a run that reaches the threshold."""

    name = "slow"
    guard = False
    traced = False  # it adds no work a span would show

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def describe(self) -> str:
        """The threshold."""
        return f"warn when the handler takes {round(self.threshold * 1000)}ms or more"

    async def around(self, ctx: Context, call_next: Handler) -> None:
        """Run the handler and time it."""
        started = time.perf_counter()
        try:
            await call_next(ctx)
        finally:
            took = time.perf_counter() - started
            if took >= self.threshold:
                self._slow(ctx, took)

    def _slow(self, ctx: Context, took: float) -> None:
        SLOW.labels(ctx.route).inc()
        ms, limit = round(took * 1000, 1), round(self.threshold * 1000, 1)
        ctx.note("slow", True)
        log.warning(
            "policyroute: slow handler on %s: %.1fms (slow: %gms)",
            ctx.route,
            ms,
            limit,
            extra={"route": ctx.route, "duration_ms": ms, "slow_ms": limit},
        )


def make_slow(policy: RoutePolicy, env: Env) -> Step | None:
    """A slow-handler warning when the route sets `slow`."""
    if policy.slow is None:
        return None
    return SlowStep(policy.slow)


register(("slow",), make_slow)
