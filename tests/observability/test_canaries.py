"""Plant every kind of secret through every path that logs, traces or counts; none may surface.

The session-wide watch (tests/observability/canary.py) scans every log record, every span
and every metric label of the whole suite; this module makes sure each canary value was
actually sent through the paths that could leak it, then checks the findings so far.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from policyroute.admin.credits import set_balance
from policyroute.backends.valkey import ValkeyStore
from policyroute.identity.totp import enrol
from policyroute.observability.logs import JsonFormatter
from tests.events.kit import topic
from tests.servers import policyroute_run

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


SERVED_APP = """\
from fastapi import FastAPI, Request

import policyroute

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@app.get("/boom")
async def boom(request: Request) -> dict[str, bool]:
    raise RuntimeError("refused " + request.headers.get("authorization", ""))


policyroute.install(app)
"""


@pytest.mark.parametrize("json_lines", [True, False], ids=["json", "text"])
def test_policyroute_run_logs_no_secret_from_uvicorn(
    tmp_path: Path, valkey_url: str, pulsar_url: str, json_lines: bool
) -> None:
    """`policyroute run` configures uvicorn's access and error loggers: each of their lines
    goes through the sanitizer (as JSON lines with POLICYROUTE_LOG_JSON=1)."""
    (tmp_path / "served_app.py").write_text(SERVED_APP)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "routes.yaml").write_text(
        "version: 1\nroutes:\n  GET /ping:\n    public: true\n  GET /boom:\n    public: true\n"
    )
    jwt = token("canary-served")
    secret_query = f"access_token={jwt}&api_key={CANARY_API_KEY}&email={CANARY_EMAIL}"
    env = {"POLICYROUTE_LOG_JSON": "1" if json_lines else "0"}
    with policyroute_run(
        tmp_path, "served_app:app", policies, valkey_url, pulsar_url, env, probe="/ping"
    ) as run:
        base = run.base
        ping = httpx.get(f"{base}/ping?{secret_query}", headers=bearer(jwt))
        boom = httpx.get(f"{base}/boom", headers={"Authorization": f"Bearer {jwt}"})
        opaque = httpx.get(f"{base}/boom", headers={"Authorization": f"Bearer {CANARY_OPAQUE}"})
    assert (ping.status_code, boom.status_code, opaque.status_code) == (200, 500, 500)
    text = run.log.read_text()
    # Uvicorn's access line names the raw path (as it should); no secret may ride along.
    assert leaks(text, paths=False) == [], text
    # Nothing else: the Pulsar client is closed before exit (no native abort line either).
    lines = [line for line in text.splitlines() if line.strip()]
    if json_lines:
        records = [json.loads(line) for line in lines]  # every line is a JSON object
        access = [r["message"] for r in records if r["logger"] == "uvicorn.access"]
        errors = [r for r in records if r["logger"] == "uvicorn.error" and "exception" in r]
        assert any("refused Bearer [REDACTED]" in r["exception"] for r in errors), text
    else:
        access = [line for line in lines if ' - "GET /' in line]
        assert "refused Bearer [REDACTED]" in text, text
    query = "access_token=[REDACTED]&api_key=[REDACTED]&email=[REDACTED]"
    assert any(f'"GET /ping?{query} HTTP/1.1" 200' in line for line in access), text
    assert sum('"GET /boom HTTP/1.1" 500' in line for line in access) == 2, text
