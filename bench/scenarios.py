"""The scenarios the harness runs: plain data, one entry per app under test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

Pairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One app under test and the request the load generator repeats against it.

    ``unique_query`` makes every request carry its own ``?n=<unique>``, so a response cache
    that varies by query misses on every request instead of serving one hot entry.
    ``connections`` overrides the run's connection count: one connection measures latency
    (req/s is then one over the mean round trip), where waiting on I/O shows.
    """

    name: str
    app: str
    env: Pairs = ()
    path: str = "/ping"
    headers: Pairs = ()
    unique_query: bool = False
    connections: int | None = None  # None: the run's setting (32)


DEV_KEY = Path(__file__).resolve().parent.parent / "examples" / "keys" / "dev-private-jwk.json"
BENCH_SUBJECT = "bench-user"


def bearer() -> Pairs:
    """An Authorization header with a DEV ONLY token for the bench routes."""
    from policyroute.identity.dev import load_private_key, mint

    token = mint(
        load_private_key(DEV_KEY), BENCH_SUBJECT, scopes=["bench:read"], roles=["bench"], ttl=3600
    )
    return (("Authorization", f"Bearer {token}"),)


# Every scenario gets the same request bytes, so header parsing costs the same everywhere.
HEADERS = bearer()


def policyroute(
    name: str, policy: str, *, unique_query: bool = True, connections: int | None = None
) -> Scenario:
    """The bench app behind ``policyroute.install`` with ``policies/<policy>/``."""
    return Scenario(
        name,
        "bench.apps.policyroute_app:app",
        (("BENCH_POLICY", policy),),
        headers=HEADERS,
        unique_query=unique_query,
        connections=connections,
    )


# Every request carries a unique query except in the cache-hit scenarios, which repeat one
# path so that after the first request each one is answered from the cache.
SCENARIOS: tuple[Scenario, ...] = (
    Scenario("bare", "bench.apps.bare:app", headers=HEADERS, unique_query=True),
    Scenario("slowapi", "bench.apps.slowapi_app:app", headers=HEADERS, unique_query=True),
    Scenario(
        "fastapi_limiter",
        "bench.apps.fastapi_limiter_app:app",
        headers=HEADERS,
        unique_query=True,
    ),
    policyroute("policyroute_core", "core"),
    # The same work as the two limiters: one Valkey-backed bucket per client address.
    policyroute("policyroute_limit", "limit"),
    policyroute("policyroute_local", "local"),
    # Every request a genuine cache miss: the handler runs and its response is stored.
    policyroute("policyroute_full", "full"),
    # The handler a cache would save: 1 ms of awaited I/O.
    Scenario("bare_sleep_1ms", "bench.apps.bare_sleep:app", headers=HEADERS, unique_query=True),
    policyroute("policyroute_cache_hit", "cache_hit", unique_query=False),
    policyroute("policyroute_cache_local", "cache_local", unique_query=False),
    # One connection: a cache hit through the whole chain against 1 ms of awaited I/O.
    # (With 32 connections the sleeps overlap and both measure CPU, not the wait saved.)
    Scenario(
        "bare_sleep_1ms_1conn",
        "bench.apps.bare_sleep:app",
        headers=HEADERS,
        unique_query=True,
        connections=1,
    ),
    policyroute("policyroute_cache_hit_1conn", "cache_hit", unique_query=False, connections=1),
    # The full chain with the OpenTelemetry SDK on (policyroute_full has it off): spans for
    # FastAPI and policyroute, or for policyroute alone. Metrics and logs are on in all three.
    Scenario(
        "policyroute_full_otel",
        "bench.apps.policyroute_otel_app:app",
        (("BENCH_POLICY", "full"), ("BENCH_OTEL", "global")),
        headers=HEADERS,
        unique_query=True,
    ),
    Scenario(
        "policyroute_full_otel_own",
        "bench.apps.policyroute_otel_app:app",
        (("BENCH_POLICY", "full"), ("BENCH_OTEL", "policyroute")),
        headers=HEADERS,
        unique_query=True,
    ),
)

BASELINE = "bare"


def by_name(names: list[str]) -> tuple[Scenario, ...]:
    """Return the scenarios with the given names, in the order of ``SCENARIOS``."""
    wanted = set(names)
    return tuple(s for s in SCENARIOS if s.name in wanted)
