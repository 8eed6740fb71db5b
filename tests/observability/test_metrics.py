"""Prometheus metrics: per-route requests and latency, decisions, denials, backend errors."""

from __future__ import annotations

import socket
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from policyroute.admin.credits import set_balance
from policyroute.backends.valkey import ValkeyStore

from .kit import bearer, install, problem, running, sample, token

ROUTES = """\
  GET /metrics: {public: true, ip_allowlist: [127.0.0.1/32]}
  GET /items/{item}:
    rate_limit: {key: user, capacity: 2, per: 60s}
    credits: {cost: 1}
    cache: {ttl: 60s}
"""


def dead_valkey_url() -> str:
    """A redis:// URL on a loopback port nothing listens on (a Valkey that is away)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def test_metrics_is_a_route_the_policy_governs(policy_dir: Path, valkey_url: str) -> None:
    app, _ = install(policy_dir, ROUTES, valkey_url=valkey_url, metrics=True)
    async with running(app) as c:
        await c.get("/items/x", headers=bearer(token("m-user")))
        allowed = await c.get("/metrics")
    async with running(app, address="10.1.2.3") as c:
        outside = await c.get("/metrics")
    assert allowed.status_code == 200
    assert allowed.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(allowed.text)}
    assert "policyroute_requests" in families and "policyroute_denials" in families
    labels = [s.labels for s in families["policyroute_denials"].samples]
    wanted = {"route": "GET /items/{item}", "step": "credits", "reason": "insufficient-credits"}
    assert wanted in [dict(lab) for lab in labels]
    assert outside.status_code == 403 and problem(outside) == "ip-not-allowed"


async def test_an_ungoverned_metrics_route_is_denied(policy_dir: Path) -> None:
    app, _ = install(policy_dir, "  GET /ping: {public: true}\n", metrics=True)
    async with running(app) as c:
        r = await c.get("/metrics")
    assert r.status_code == 403 and problem(r) == "no-policy"


async def test_requests_decisions_and_denials_are_counted_per_route(
    policy_dir: Path, valkey_url: str
) -> None:
    app, engine = install(policy_dir, ROUTES, valkey_url=valkey_url)
    route = "GET /items/{item}"
    store = ValkeyStore(valkey_url, prefix=engine.config.key_prefix)
    try:
        await set_balance(store, "counted", 1)
    finally:
        await store.stop()

    def snapshot() -> dict[str, float]:
        return {
            "ok": sample(
                "policyroute_requests_total",
                route=route,
                method="GET",
                outcome="allowed",
                status="2xx",
            ),
            "denied4": sample(
                "policyroute_requests_total",
                route=route,
                method="GET",
                outcome="denied",
                status="4xx",
            ),
            "timed": sample(
                "policyroute_request_duration_seconds_count", route=route, method="GET"
            ),
            "miss": sample("policyroute_cache_lookups_total", route=route, outcome="miss"),
            "hit": sample("policyroute_cache_lookups_total", route=route, outcome="hit"),
            "charged": sample(
                "policyroute_credits_decisions_total", route=route, outcome="charged"
            ),
            "short": sample(
                "policyroute_credits_decisions_total", route=route, outcome="insufficient"
            ),
            "allowed": sample(
                "policyroute_rate_limit_decisions_total", route=route, outcome="allowed"
            ),
            "limited": sample(
                "policyroute_rate_limit_decisions_total", route=route, outcome="limited"
            ),
            "d402": sample(
                "policyroute_denials_total",
                route=route,
                step="credits",
                reason="insufficient-credits",
            ),
            "d429": sample(
                "policyroute_denials_total", route=route, step="rate_limit", reason="rate-limited"
            ),
            "d401": sample(
                "policyroute_denials_total", route=route, step="auth", reason="unauthenticated"
            ),
        }

    before = snapshot()
    auth = bearer(token("counted"))
    async with running(app) as c:
        statuses = [
            (await c.get("/items/a", headers=auth)).status_code,  # miss, charged
            (await c.get("/items/a", headers=auth)).status_code,  # hit, free
            (await c.get("/items/b", headers=auth)).status_code,  # limited
            (await c.get("/items/b")).status_code,  # no token
        ]
    assert statuses == [200, 200, 429, 401]
    after = snapshot()
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {
        "ok": 2,
        "denied4": 2,
        "timed": 4,
        "miss": 1,
        "hit": 1,
        "charged": 1,
        "short": 0,
        "allowed": 2,
        "limited": 1,
        "d402": 0,
        "d429": 1,
        "d401": 1,
    }


async def test_metric_labels_are_templates_never_raw_paths(
    policy_dir: Path, valkey_url: str
) -> None:
    app, _ = install(policy_dir, ROUTES, valkey_url=valkey_url, metrics=True)
    async with running(app) as c:
        await c.get("/items/raw-segment-91", headers=bearer(token("raw-user")))
        text = (await c.get("/metrics")).text
    assert 'route="GET /items/{item}"' in text
    assert "raw-segment-91" not in text and "raw-user" not in text


async def test_backend_errors_are_counted_open_or_closed(policy_dir: Path) -> None:
    routes = """\
  GET /items/{item}:
    public: true
    rate_limit: {key: ip, capacity: 5, per: 60s, on_backend_error: open}
  GET /me:
    public: true
    rate_limit: {key: ip, capacity: 5, per: 60s, on_backend_error: closed}
"""
    app, _ = install(policy_dir, routes, valkey_url=dead_valkey_url())

    def errors(route: str, outcome: str) -> float:
        return sample(
            "policyroute_backend_errors_total", backend="valkey", route=route, outcome=outcome
        )

    before = errors("GET /items/{item}", "open"), errors("GET /me", "closed")
    async with running(app) as c:
        opened = await c.get("/items/x")
        closed = await c.get("/me")
    assert opened.status_code == 200
    assert closed.status_code == 503 and problem(closed) == "backend-unavailable"
    assert errors("GET /items/{item}", "open") == before[0] + 1
    assert errors("GET /me", "closed") == before[1] + 1


def test_latency_buckets_are_cumulative_in_the_exposition() -> None:
    from prometheus_client import generate_latest

    from policyroute.observability.metrics import LATENCY

    route = "GET /bucket-check"
    timer = LATENCY.labels(route, "GET")
    for seconds in (0.0005, 0.003, 0.003, 20.0):
        timer.observe(seconds)
    text = generate_latest().decode()
    (family,) = [
        f for f in text_string_to_metric_families(text) if f.name == LATENCY.name
    ]
    mine = {
        s.labels.get("le", s.name): s.value
        for s in family.samples
        if s.labels.get("route") == route
    }
    assert mine["0.001"] == 1 and mine["0.0025"] == 1 and mine["0.005"] == 3
    assert mine["10.0"] == 3 and mine["+Inf"] == 4
    assert mine[LATENCY.name + "_count"] == 4
    assert mine[LATENCY.name + "_sum"] == 20.0065
