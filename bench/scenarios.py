"""The scenarios the harness runs: plain data, one entry per app under test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

Pairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One app under test and the request the load generator repeats against it."""

    name: str
    app: str
    env: Pairs = ()
    path: str = "/ping"
    headers: Pairs = ()


DEV_KEY = Path(__file__).resolve().parent.parent / "examples" / "keys" / "dev-private-jwk.json"
BENCH_SUBJECT = "bench-user"


def bearer() -> Pairs:
    """An Authorization header with a DEV ONLY token for the bench routes."""
    from policyroute.identity.dev import load_private_key, mint

    token = mint(load_private_key(DEV_KEY), BENCH_SUBJECT, scopes=["bench:read"], roles=["bench"],
                 ttl=3600)
    return (("Authorization", f"Bearer {token}"),)


# Every scenario gets the same request bytes, so header parsing costs the same everywhere.
HEADERS = bearer()

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("bare", "bench.apps.bare:app", headers=HEADERS),
    Scenario("slowapi", "bench.apps.slowapi_app:app", headers=HEADERS),
    Scenario("fastapi_limiter", "bench.apps.fastapi_limiter_app:app", headers=HEADERS),
    Scenario(
        "policyroute_core", "bench.apps.policyroute_app:app", (("BENCH_POLICY", "core"),),
        headers=HEADERS,
    ),
    # The same work as the two limiters: one Valkey-backed bucket per client address.
    Scenario(
        "policyroute_limit", "bench.apps.policyroute_app:app", (("BENCH_POLICY", "limit"),),
        headers=HEADERS,
    ),
    Scenario(
        "policyroute_local", "bench.apps.policyroute_app:app", (("BENCH_POLICY", "local"),),
        headers=HEADERS,
    ),
    Scenario(
        "policyroute_full", "bench.apps.policyroute_app:app", (("BENCH_POLICY", "full"),),
        headers=HEADERS,
    ),
)

BASELINE = "bare"


def by_name(names: list[str]) -> tuple[Scenario, ...]:
    """Return the scenarios with the given names, in the order of ``SCENARIOS``."""
    wanted = set(names)
    return tuple(s for s in SCENARIOS if s.name in wanted)
