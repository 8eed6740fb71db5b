"""Plant every kind of secret through every path that logs, traces or counts; none may surface.

The session-wide watch (tests/observability/canary.py) scans every log record, every span
and every metric label of the whole suite; this module makes sure each canary value was
actually sent through the paths that could leak it, then checks the findings so far.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from policyroute.backends.valkey import ValkeyStore
from policyroute.credits import set_balance
from policyroute.identity.totp import enrol
from policyroute.observability.logs import JsonFormatter
from tests.events.kit import topic

from .canary import (
    CANARY_API_KEY,
    CANARY_EMAIL,
    CANARY_IDEM,
    CANARY_OPAQUE,
    CANARY_PATH,
    CANARY_TOTP,
    FINDINGS,
    leaks,
    recording,
    scan_metrics,
)
from .kit import SETTINGS, bearer, install, running, token

SETTINGS_8 = SETTINGS.replace("realm: io\n", "realm: io\n    totp: {digits: 8}\n")


def routes(events_topic: str) -> str:
    """Routes that take every canary through auth, MFA, limits, credits, cache and events."""
    return f"""\
  GET /me:
    mfa: {{methods: [totp]}}
  POST /jobs:
    idempotency: {{required: true}}
    rate_limit: [{{key: api_key, capacity: 100, per: 60s}}, {{key: user, capacity: 1, per: 60s, enforce: false}}]
    credits: {{cost: 1}}
    events: {{topic: '{events_topic}', fields: {{request: [name]}}}}
  POST /profile:
    public: true
  GET /items/{{item}}:
    public: true
    cache: {{ttl: 60s}}
    slow: 1ms
  GET /boom:
    public: true
"""


def test_the_scanner_finds_each_canary_and_any_jwt() -> None:
    jwt = token("scanner")
    args = (jwt, CANARY_IDEM, CANARY_TOTP)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s %s %s", args, None)
    found = leaks(JsonFormatter().format(record))
    assert set(found) == {"a JWT", CANARY_IDEM, CANARY_TOTP}
    assert leaks(f"id 1{CANARY_TOTP}2") == []  # a longer number is not the code


async def test_canaries_sent_everywhere_surface_nowhere(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    app, engine = install(
        policy_dir,
        routes(topic("canary")),
        valkey_url=valkey_url,
        pulsar_url=pulsar_url,
        policy_settings=SETTINGS_8,
    )
    store = ValkeyStore(valkey_url, prefix=engine.config.key_prefix)
    try:
        await enrol(store, "canary-user")
        await set_balance(store, "canary-user", 0)
        user = bearer(token("canary-user"))
        logs_before, spans_before = FINDINGS.scanned["logs"], FINDINGS.scanned["spans"]
        job = {
            **user,
            "Idempotency-Key": CANARY_IDEM,
            "X-Api-Key": CANARY_API_KEY,
            "x-request-id": "canary-run",
        }
        with recording() as spans:
            async with running(app) as c:
                statuses = [
                    (await c.get("/me", headers={**user, "X-TOTP-Code": CANARY_TOTP})).status_code,
                    (
                        await c.get("/me", headers={"Authorization": f"Bearer {CANARY_OPAQUE}"})
                    ).status_code,
                    (
                        await c.get("/me", headers={"Authorization": f"Bearer {CANARY_OPAQUE}.x.y"})
                    ).status_code,
                    (await c.post("/jobs", json={"name": "n"}, headers=job)).status_code,
                ]
                await set_balance(store, "canary-user", 5)
                statuses += [
                    (await c.post("/jobs", json={"name": "n"}, headers=job)).status_code,
                    (await c.post("/jobs", json={"name": "n"}, headers=job)).status_code,
                    (
                        await c.post("/profile", json={"email": CANARY_EMAIL}, headers=user)
                    ).status_code,
                    (await c.get(f"/items/{CANARY_PATH}?email={CANARY_EMAIL}")).status_code,
                    (await c.get(f"/items/{CANARY_PATH}?email={CANARY_EMAIL}")).status_code,
                ]
            async with LifespanManager(app) as manager:
                transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    statuses.append((await c.get("/boom", headers=user)).status_code)
    finally:
        await store.stop()
    assert statuses == [401, 401, 401, 402, 201, 201, 200, 200, 200, 500]
    assert FINDINGS.scanned["logs"] > logs_before and FINDINGS.scanned["spans"] > spans_before
    assert any(s.name == "policyroute.events" for s in spans)  # the event's span was made
    scan_metrics()
    assert FINDINGS.all() == []
