"""/healthz and /readyz: ordinary routes the policy governs; readiness names every check."""

from __future__ import annotations

from pathlib import Path

import pytest

import policyroute
from policyroute import ConfigError
from policyroute.backends.embedded import start_valkey
from tests.events.kit import dead_pulsar_url

from .kit import install, make_app, problem, running, write

PROBES = """\
  GET /healthz: {public: true}
  GET /readyz: {public: true}
  GET /ping: {public: true}
"""


async def test_ready_when_valkey_and_the_broker_answer(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    app, _ = install(policy_dir, PROBES, valkey_url=valkey_url, pulsar_url=pulsar_url, health=True)
    async with running(app) as c:
        live = await c.get("/healthz")
        ready = await c.get("/readyz")
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["checks"]["valkey"]["ok"] is True
    assert body["checks"]["pulsar"]["ok"] is True
    assert body["checks"]["policies"] == {"ok": True, "routes": 3, "last_reload_error": None}
    assert ready.headers["cache-control"] == "no-store"


async def test_unready_while_valkey_is_down(policy_dir: Path) -> None:
    server = start_valkey()
    stopped = False
    try:
        app, _ = install(policy_dir, PROBES, valkey_url=server.url, health=True)
        async with running(app) as c:
            up = await c.get("/readyz")
            server.stop()
            stopped = True
            down = await c.get("/readyz")
            live = await c.get("/healthz")
    finally:
        if not stopped:
            server.stop()
    assert up.status_code == 200
    assert down.status_code == 503
    assert down.json()["status"] == "unready"
    assert down.json()["checks"]["valkey"]["ok"] is False
    assert live.status_code == 200  # alive all the same: restarting would not bring Valkey back


async def test_unready_while_the_broker_is_away(policy_dir: Path, valkey_url: str) -> None:
    app, _ = install(
        policy_dir, PROBES, valkey_url=valkey_url, pulsar_url=dead_pulsar_url(), health=True
    )
    async with running(app) as c:
        r = await c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["pulsar"]["ok"] is False
    assert r.json()["checks"]["valkey"]["ok"] is True


async def test_a_refused_reload_is_reported_while_the_last_good_policy_serves(
    policy_dir: Path,
) -> None:
    app, engine = install(policy_dir, PROBES, health=True)
    write(policy_dir, PROBES + "  GET /ping: {public: nope}\n")
    assert engine.reload() is not None
    async with running(app) as c:
        ready = await c.get("/readyz")
        ping = await c.get("/ping")
    assert ready.status_code == 200 and ping.status_code == 200
    error = ready.json()["checks"]["policies"]["last_reload_error"]
    assert error and "routes.yaml" in error


async def test_ungoverned_probes_are_denied_like_any_route(policy_dir: Path) -> None:
    app, _ = install(policy_dir, "  GET /ping: {public: true}\n", health=True)
    async with running(app) as c:
        r = await c.get("/healthz")
    assert r.status_code == 403 and problem(r) == "no-policy"
    write(policy_dir, "  GET /ping: {public: true}\n")
    with pytest.raises(ConfigError, match="GET /healthz"):
        policyroute.install(make_app({}), policy_dir, strict=True, health=True)
