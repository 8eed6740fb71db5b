"""The scenarios the harness runs: plain data, one entry per app under test."""

from __future__ import annotations

from dataclasses import dataclass

Pairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One app under test and the request the load generator repeats against it."""

    name: str
    app: str
    env: Pairs = ()
    path: str = "/ping"
    headers: Pairs = ()


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("bare", "bench.apps.bare:app"),
    Scenario("slowapi", "bench.apps.slowapi_app:app"),
    Scenario("fastapi_limiter", "bench.apps.fastapi_limiter_app:app"),
    Scenario("policyroute_core", "bench.apps.policyroute_app:app", (("BENCH_POLICY", "core"),)),
    # The same work as the two limiters: one Valkey-backed bucket per client address.
    Scenario("policyroute_limit", "bench.apps.policyroute_app:app", (("BENCH_POLICY", "limit"),)),
)

BASELINE = "bare"


def by_name(names: list[str]) -> tuple[Scenario, ...]:
    """Return the scenarios with the given names, in the order of ``SCENARIOS``."""
    wanted = set(names)
    return tuple(s for s in SCENARIOS if s.name in wanted)
