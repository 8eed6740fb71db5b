"""Shadow mode (`enforce: false`): evaluate, record what would be refused, refuse nothing.

Semantics under test (policyroute/observability/shadow.py): a shadowed limit counts in a
bucket of its own, so the caller's real budget is untouched; shadowed credits read the
balance and never charge; shadowed MFA verifies a code without using it up or counting a
failure; a shadowed route runs its handler whatever the guards say; the first would-be
refusal of a request is counted, logged and named on its span.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import pytest

from policyroute.admin.credits import set_balance, show
from policyroute.backends.valkey import ValkeyStore
from policyroute.identity.totp import code_at, enrol
from policyroute.review.explain import explain
from tests.observability.canary import recording
from tests.observability.kit import (
    SETTINGS,
    bearer,
    install,
    problem,
    running,
    sample,
    token,
    write,
)


def shadowed(route: str, step: str, reason: str) -> float:
    """Would-be refusals counted so far."""
    return sample("policyroute_shadow_denials_total", route=route, step=step, reason=reason)


def decided(kind: str, route: str, outcome: str) -> float:
    """Decisions of a kind counted so far."""
    return sample(f"policyroute_{kind}_decisions_total", route=route, outcome=outcome)


async def test_a_shadowed_route_lets_every_caller_through_and_records_the_first_refusal(
    policy_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    routes = "  GET /me:\n    enforce: false\n    scopes: [admin]\n    ip_allowlist: [10.0.0.0/8]\n"
    app, _ = install(policy_dir, routes)
    before = {
        r: shadowed("GET /me", s, r)
        for s, r in [
            ("ip_allowlist", "ip-not-allowed"),
            ("auth", "unauthenticated"),
            ("scopes", "insufficient-scope"),
        ]
    }
    with caplog.at_level(logging.WARNING, logger="policyroute.shadow"), recording() as spans:
        async with running(app) as c:
            anonymous = await c.get("/me")
        async with running(app, address="10.0.0.9") as c:
            unscoped = await c.get("/me", headers=bearer(token("sam")))
            admin = await c.get("/me", headers=bearer(token("ada", scopes=["admin"])))
    assert (anonymous.status_code, unscoped.status_code, admin.status_code) == (200, 200, 200)
    assert anonymous.json() == {"subject": None}  # a shadowed auth failure stays anonymous
    assert unscoped.json() == {"subject": "sam"}
    # One per request: enforcement would have stopped at the first refusal.
    assert shadowed("GET /me", "ip_allowlist", "ip-not-allowed") == before["ip-not-allowed"] + 1
    assert shadowed("GET /me", "auth", "unauthenticated") == before["unauthenticated"]
    assert shadowed("GET /me", "scopes", "insufficient-scope") == before["insufficient-scope"] + 1
    messages = [r.getMessage() for r in caplog.records if r.name == "policyroute.shadow"]
    assert messages == [
        "policyroute: shadow: GET /me would be refused by ip_allowlist (ip-not-allowed, 403)",
        "policyroute: shadow: GET /me would be refused by scopes (insufficient-scope, 403)",
    ]
    roots = sorted(
        (
            s
            for s in spans
            if s.name == "GET /me"
            and s.instrumentation_scope
            and s.instrumentation_scope.name == "policyroute"
        ),
        key=lambda s: s.start_time or 0,
    )
    assert [dict(s.attributes or {}).get("policyroute.shadow.denied") for s in roots] == [
        "ip-not-allowed",
        "insufficient-scope",
        None,
    ]
    assert all(dict(s.attributes or {})["policyroute.allowed"] for s in roots)


async def test_a_shadowed_limit_never_spends_the_real_budget(
    policy_dir: Path, valkey_url: str
) -> None:
    prefix = "t" + uuid.uuid4().hex[:10]
    shadow = "  GET /ping:\n    rate_limit: {key: user, capacity: 2, per: 60s, enforce: false}\n"
    app, _ = install(policy_dir, shadow, valkey_url=valkey_url, key_prefix=prefix)
    route, auth = "GET /ping", bearer(token("lim"))
    limited, allowed = (
        decided("rate_limit", route, "shadow_limited"),
        decided("rate_limit", route, "shadow_allowed"),
    )
    refused = shadowed(route, "rate_limit", "rate-limited")
    async with running(app) as c:
        answers = [await c.get("/ping", headers=auth) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 200]
    assert "ratelimit" not in answers[-1].headers  # the client sees no trace of the shadow
    assert decided("rate_limit", route, "shadow_allowed") == allowed + 2
    assert decided("rate_limit", route, "shadow_limited") == limited + 2
    assert shadowed(route, "rate_limit", "rate-limited") == refused + 2
    # Enforcement turned on later: the same caller, same keys, starts with a full budget.
    enforced = shadow.replace(", enforce: false", "")
    app, _ = install(policy_dir, enforced, valkey_url=valkey_url, key_prefix=prefix)
    async with running(app) as c:
        after = [(await c.get("/ping", headers=auth)).status_code for _ in range(3)]
    assert after == [200, 200, 429]


async def test_a_shadowed_concurrency_cap_releases_its_slots(
    policy_dir: Path, valkey_url: str
) -> None:
    routes = (
        "  GET /items/{item}:\n    public: true\n"
        "    rate_limit: {key: ip, algorithm: concurrency, capacity: 1, enforce: false}\n"
    )
    app, _ = install(policy_dir, routes, valkey_url=valkey_url)
    route = "GET /items/{item}"
    limited, allowed = (
        decided("rate_limit", route, "shadow_limited"),
        decided("rate_limit", route, "shadow_allowed"),
    )
    async with running(app) as c:
        together = await asyncio.gather(*(c.get("/items/x?sleep=0.2") for _ in range(3)))
        alone = await c.get("/items/x")
    assert [r.status_code for r in together] == [200, 200, 200] and alone.status_code == 200
    assert decided("rate_limit", route, "shadow_limited") == limited + 2
    assert decided("rate_limit", route, "shadow_allowed") == allowed + 2  # the slot came back


async def test_shadowed_credits_read_the_balance_and_never_charge(
    policy_dir: Path, valkey_url: str
) -> None:
    routes = "  GET /items/{item}:\n    credits: {cost: 2, enforce: false}\n    cache: {ttl: 60s}\n"
    app, engine = install(policy_dir, routes, valkey_url=valkey_url)
    route, auth = "GET /items/{item}", bearer(token("payer"))
    store = ValkeyStore(valkey_url, prefix=engine.config.key_prefix)
    try:
        await set_balance(store, "payer", 3)
        enough = decided("credits", route, "shadow_sufficient")
        short = decided("credits", route, "shadow_insufficient")
        refused = shadowed(route, "credits", "insufficient-credits")
        async with running(app) as c:
            funded = [(await c.get(f"/items/{i}", headers=auth)).status_code for i in "ab"]
            await set_balance(store, "payer", 1)
            broke = await c.get("/items/c", headers=auth)
            cached = await c.get("/items/a", headers=auth)  # a hit would not be charged
        balance = await show(store, "payer")
    finally:
        await store.stop()
    assert funded == [200, 200] and broke.status_code == 200 and cached.status_code == 200
    assert cached.headers["x-cache"] == "hit"
    assert balance.total == 1  # never charged, never refunded
    assert decided("credits", route, "shadow_sufficient") == enough + 2
    assert decided("credits", route, "shadow_insufficient") == short + 1
    assert shadowed(route, "credits", "insufficient-credits") == refused + 1


async def test_a_shadowed_route_charges_nothing_and_limits_nothing(
    policy_dir: Path, valkey_url: str
) -> None:
    routes = (
        "  GET /ping:\n    enforce: false\n    rate_limit: {key: user, capacity: 1, per: 60s}\n"
        "    credits: {cost: 1}\n"
    )
    app, engine = install(policy_dir, routes, valkey_url=valkey_url)
    store = ValkeyStore(valkey_url, prefix=engine.config.key_prefix)
    try:
        await set_balance(store, "route-shadow", 1)
        async with running(app) as c:
            answers = [
                (await c.get("/ping", headers=bearer(token("route-shadow")))).status_code
                for _ in range(3)
            ]
        balance = await show(store, "route-shadow")
    finally:
        await store.stop()
    assert answers == [200, 200, 200]
    assert balance.total == 1


async def test_shadowed_mfa_checks_a_code_without_using_it_up(
    policy_dir: Path, valkey_url: str
) -> None:
    lockout = SETTINGS.replace(
        "realm: io\n", "realm: io\n    totp: {max_failures: 2, lockout: 120s}\n"
    )
    routes = (
        "  GET /me:\n    mfa: {methods: [totp], enforce: false}\n"
        "  POST /profile:\n    mfa: {methods: [totp]}\n"
    )
    app, engine = install(policy_dir, routes, valkey_url=valkey_url, policy_settings=lockout)
    subject = f"mfa-{uuid.uuid4().hex[:8]}"
    store = ValkeyStore(valkey_url, prefix=engine.config.key_prefix)
    try:
        secret = (await enrol(store, subject)).secret
    finally:
        await store.stop()
    auth = bearer(token(subject))
    code = code_at(secret, time.time())
    wrong = "000000" if code != "000000" else "111111"
    missing = shadowed("GET /me", "mfa", "mfa-required")
    invalid = shadowed("GET /me", "mfa", "mfa-invalid")
    async with running(app) as c:
        without = await c.get("/me", headers=auth)
        wrongs = [await c.get("/me", headers={**auth, "X-TOTP-Code": wrong}) for _ in range(3)]
        shadow_ok = await c.get("/me", headers={**auth, "X-TOTP-Code": code})
        enforced = await c.post("/profile", json={}, headers={**auth, "X-TOTP-Code": code})
        replayed = await c.post("/profile", json={}, headers={**auth, "X-TOTP-Code": code})
    assert without.status_code == 200 and all(w.status_code == 200 for w in wrongs)
    assert shadow_ok.status_code == 200
    # Three wrong codes in shadow mode counted no failure (the lockout is 2) and the right
    # code was not used up: the enforced route accepts it once.
    assert enforced.status_code == 200
    assert replayed.status_code == 401 and problem(replayed) == "mfa-invalid"
    assert shadowed("GET /me", "mfa", "mfa-required") == missing + 1
    assert shadowed("GET /me", "mfa", "mfa-invalid") == invalid + 3


async def test_a_shadowed_route_records_a_missing_key_but_still_refuses_a_reused_one(
    policy_dir: Path, valkey_url: str
) -> None:
    routes = (
        "  POST /jobs:\n    public: true\n    enforce: false\n    idempotency: {required: true}\n"
    )
    app, _ = install(policy_dir, routes, valkey_url=valkey_url)
    missing = shadowed("POST /jobs", "idempotency", "idempotency-key-missing")
    async with running(app) as c:
        keyless = await c.post("/jobs", json={"name": "a"})
        first = await c.post("/jobs", json={"name": "a"}, headers={"Idempotency-Key": "k1"})
        other = await c.post("/jobs", json={"name": "b"}, headers={"Idempotency-Key": "k1"})
    assert keyless.status_code == 201 and first.status_code == 201
    assert other.status_code == 422 and problem(other) == "idempotency-key-reused"
    assert shadowed("POST /jobs", "idempotency", "idempotency-key-missing") == missing + 1


def test_explain_marks_what_is_shadowed(policy_dir: Path) -> None:
    write(
        policy_dir,
        "  GET /me:\n    enforce: false\n    scopes: [a]\n"
        "  GET /ping:\n    mfa: {methods: [step_up], enforce: false}\n"
        "    rate_limit: [{key: user, capacity: 5, per: 1s}, {key: ip, capacity: 9, per: 1s, enforce: false}]\n"
        "    credits: {cost: 1, enforce: false}\n",
    )
    text = explain([policy_dir])
    me = text.split("GET /ping")[0]
    assert "2. scopes: all of a" in me and "enforce: false   <- route" in me
    assert "[shadow: enforce false]" in text.split("3. mfa:")[1].splitlines()[0]
    assert "ip: token bucket of 9 per ip, +9 per 1s, cost 1 (shadow: enforce false)" in text
    assert "user: token bucket of 5 per user" in text
    assert "credits(cost 1 (shadow: enforce false; read, never charged))" in text
