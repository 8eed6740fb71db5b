"""settings.auth.lockout: failed authentications counted per address and subject, on Valkey.

The scale-out tests (tests/test_scale_out_patterns.py) hold the counts across processes
and concurrent clients; these look at one process: what counts as a failure, one-time
codes, shadow mode, the metrics, and a backend that is away.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

import policyroute
import policyroute.testing
from policyroute.backends.valkey import ValkeyStore
from policyroute.engine.services import default_services
from policyroute.identity.totp import code_at, enrol
from tests.observability.kit import sample

from .identity_kit import ISSUER_YAML, bearer, make_app, problem_type, subject, token

ROUTES = """\
  GET /me: {}
  GET /admin:
    mfa: {methods: [totp]}
  GET /open:
    public: true
"""


def settings(lockout: str) -> str:
    """Settings trusting the dev issuer and 127.0.0.1 as a proxy (so tests pick addresses)."""
    return (
        "settings:\n  trusted_proxies: [127.0.0.1/32]\n  auth:\n    realm: io\n"
        f"    require_typ: at+jwt\n    lockout: {lockout}\n    issuers:\n{ISSUER_YAML}"
    )


@contextlib.asynccontextmanager
async def serve(
    policy_dir: Path, lockout: str, valkey_url: str, routes: str = ROUTES
) -> AsyncIterator[tuple[httpx.AsyncClient, ValkeyStore]]:
    """The identity test app under `lockout`, its keys under a fresh prefix; and its store."""
    (policy_dir / "identity.yaml").write_text(f"version: 1\n{settings(lockout)}routes:\n{routes}")
    prefix = "t" + uuid.uuid4().hex[:10]
    app = make_app()

    def services(engine: Any) -> Mapping[str, Any]:
        return default_services(engine)

    config = policyroute.Settings(valkey_url=valkey_url, key_prefix=prefix)
    policyroute.install(app, policy_dir, settings=config, services=services)
    store = ValkeyStore(valkey_url, prefix=prefix)
    try:
        async with policyroute.testing.client(app) as c:
            yield c, store
    finally:
        await store.stop()


def at(address: str, value: str | None = None, **headers: str) -> dict[str, str]:
    """Headers of a request from `address` (through the trusted proxy), with a token."""
    out = {"X-Forwarded-For": address, **headers}
    return {**out, **bearer(value)} if value is not None else out


def forged(valid: str, n: int = 0) -> str:
    """The token with its signature broken: it still claims the same subject."""
    head, payload, signature = valid.split(".")
    return f"{head}.{payload}.{n:08d}{signature[8:]}"


def decided(outcome: str, route: str = "GET /me") -> float:
    """Lockout decisions counted so far."""
    return sample("policyroute_lockout_decisions_total", route=route, outcome=outcome)


async def test_failed_tokens_block_the_address_with_retry_after(
    policy_dir: Path, valkey_url: str
) -> None:
    before = {o: decided(o) for o in ("failure", "locked", "blocked")}
    async with serve(policy_dir, "{failures: 3, per: 1m, block: 2m}", valkey_url) as (c, _):
        valid = token(subject())
        answers = [await c.get("/me", headers=at("10.0.0.1", forged(valid, n))) for n in range(5)]
        assert [r.status_code for r in answers] == [401, 401, 401, 429, 429]
        assert [problem_type(r) for r in answers[3:]] == ["auth-locked", "auth-locked"]
        assert 110 <= int(answers[3].headers["retry-after"]) <= 120
        # Every route that needs a token, valid ones included; public routes are not guarded.
        other = token(subject())
        assert (await c.get("/me", headers=at("10.0.0.1", other))).status_code == 429
        assert (await c.get("/admin", headers=at("10.0.0.1", other))).status_code == 429
        assert (await c.get("/open", headers=at("10.0.0.1"))).status_code == 200
        assert (await c.get("/me", headers=at("10.0.0.2", other))).status_code == 200
    assert decided("failure") == before["failure"] + 2
    assert decided("locked") == before["locked"] + 1
    assert decided("blocked") == before["blocked"] + 3  # the /admin one counts on its route


async def test_only_refused_tokens_count(policy_dir: Path, valkey_url: str) -> None:
    async with serve(policy_dir, "{failures: 2, per: 1m, block: 1m}", valkey_url) as (c, _):
        where = "10.0.1.1"
        missing = [await c.get("/me", headers=at(where)) for _ in range(4)]
        malformed = [
            await c.get("/me", headers={**at(where), "Authorization": "Bearer a b"})
            for _ in range(4)
        ]
        assert {r.status_code for r in missing} == {401}
        assert {r.status_code for r in malformed} == {400}
        valid = token(subject())
        assert [(await c.get("/me", headers=at(where, valid))).status_code for _ in range(3)] == [
            200,
            200,
            200,
        ]
        # Two refused tokens are the limit.
        bad = [(await c.get("/me", headers=at(where, forged(valid, n)))).status_code for n in (1, 2)]
        assert bad == [401, 401]
        assert (await c.get("/me", headers=at(where, valid))).status_code == 429


async def test_a_subject_is_blocked_at_the_addresses_that_failed_only(
    policy_dir: Path, valkey_url: str
) -> None:
    async with serve(policy_dir, "{failures: 3, per: 1m, block: 1m}", valkey_url) as (c, _):
        victim = subject()
        valid = token(victim)
        for n, where in enumerate(("10.0.2.1", "10.0.2.2", "10.0.2.3")):
            assert (await c.get("/me", headers=at(where, forged(valid, n)))).status_code == 401
        for where in ("10.0.2.1", "10.0.2.2", "10.0.2.3"):
            refused = await c.get("/me", headers=at(where, valid))
            assert refused.status_code == 429 and problem_type(refused) == "auth-locked"
            # Those addresses are not blocked for anyone else (one failure each).
            assert (await c.get("/me", headers=at(where, token(subject())))).status_code == 200
        assert (await c.get("/me", headers=at("10.0.2.9", valid))).status_code == 200
        # The subject is hot: a new address that fails for it is blocked for it at once.
        assert (await c.get("/me", headers=at("10.0.2.4", forged(valid, 7)))).status_code == 401
        assert (await c.get("/me", headers=at("10.0.2.4", valid))).status_code == 429
        assert (await c.get("/me", headers=at("10.0.2.9", valid))).status_code == 200


async def test_wrong_one_time_codes_count_and_the_right_one_is_refused_while_blocked(
    policy_dir: Path, valkey_url: str
) -> None:
    async with serve(policy_dir, "{failures: 3, per: 1m, block: 1m}", valkey_url) as (c, store):
        who = subject()
        secret = (await enrol(store, who)).secret
        right = code_at(secret, time.time())
        wrong = "000000" if right != "000000" else "111111"
        value = token(who)
        codes = [
            await c.get("/admin", headers=at("10.0.3.1", value, **{"X-TOTP-Code": wrong}))
            for _ in range(3)
        ]
        assert [r.status_code for r in codes] == [401, 401, 401]
        assert {problem_type(r) for r in codes} == {"mfa-invalid"}
        blocked = await c.get("/admin", headers=at("10.0.3.1", value, **{"X-TOTP-Code": right}))
        assert blocked.status_code == 429 and problem_type(blocked) == "auth-locked"
        # The subject's own device elsewhere is not locked out (the TOTP lock of 5 was not hit).
        elsewhere = await c.get("/admin", headers=at("10.0.3.2", value, **{"X-TOTP-Code": right}))
        assert elsewhere.status_code == 200


async def test_shadow_mode_counts_and_reports_but_never_refuses(
    policy_dir: Path, valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    shadowed = "policyroute_shadow_denials_total"
    labels = {"route": "GET /me", "step": "auth", "reason": "auth-locked"}
    before = sample(shadowed, **labels), decided("shadow_blocked"), decided("shadow_locked")
    failures = decided("shadow_failure")
    lockout = "{failures: 2, per: 1m, block: 1m, enforce: false}"
    with caplog.at_level(logging.WARNING, logger="policyroute.shadow"):
        async with serve(policy_dir, lockout, valkey_url) as (c, store):
            valid = token(subject())
            bad = [await c.get("/me", headers=at("10.0.4.1", forged(valid, n))) for n in range(4)]
            good = await c.get("/me", headers=at("10.0.4.1", valid))
            keys = await store.command("KEYS", f"{store.prefix}:*", operation="test")
    assert [r.status_code for r in bad] == [401, 401, 401, 401]
    assert good.status_code == 200
    # Nothing stops the failures in shadow mode: from the second on, each would (re)start
    # a block (of the address, or of the subject that is hot there).
    assert decided("shadow_failure") == failures + 1
    assert decided("shadow_locked") == before[2] + 3
    # Blocked would have been: the last two bad tokens, then the good one.
    assert decided("shadow_blocked") == before[1] + 3
    assert sample(shadowed, **labels) == before[0] + 3
    assert "GET /me would be refused by auth (auth-locked, 429)" in caplog.text
    # Counted in keys of their own: enforcing later starts everyone afresh.
    names = {k.decode() for k in keys}
    assert names and all(":los:" in n for n in names)


@pytest.mark.parametrize(("mode", "status"), [("open", 200), ("closed", 503)])
async def test_without_valkey_tokens_are_checked_uncounted_or_refused(
    policy_dir: Path, mode: str, status: int
) -> None:
    from tests.servers import free_port

    gone = f"redis://127.0.0.1:{free_port()}/0"
    lockout = f"{{failures: 3, per: 1m, block: 1m, on_backend_error: {mode}}}"
    labels = {"backend": "valkey", "route": "GET /me", "outcome": mode}
    before = sample("policyroute_backend_errors_total", **labels)
    async with serve(policy_dir, lockout, gone) as (c, _):
        answer = await c.get("/me", headers=at("10.0.5.1", token(subject())))
    assert answer.status_code == status
    assert sample("policyroute_backend_errors_total", **labels) == before + 1
    if status == 503:
        assert problem_type(answer) == "backend-unavailable"
