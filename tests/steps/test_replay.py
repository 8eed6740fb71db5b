"""`replay: jti`: one-time tokens on a real Valkey (across workers: tests/test_scale_out_patterns.py)."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from joserfc import jwt

import policyroute
from policyroute import ConfigError
from policyroute.admin import credits
from policyroute.backends.keys import digest
from policyroute.backends.valkey import ValkeyStore
from policyroute.identity.dev import DEV_AUDIENCE, DEV_ISSUER
from tests.observability.kit import sample

from .identity_kit import SETTINGS, bearer, challenge, dev_key, problem_type, subject, token
from .stateful import engine, install, make_app, running

POLICY = f"""\
version: 1
{SETTINGS}routes:
  GET /limited:
    replay: jti
  POST /charge:
    replay: jti
    credits: {{cost: 1}}
  GET /other:
    replay: {{by: jti, enforce: false}}
  GET /slow:
    replay: jti
  GET /cached/{{item}}: {{}}
"""


def without_jti(who: str) -> str:
    """A dev token like `token`, but with no jti claim at all."""
    now = int(time.time())
    claims = {"iss": DEV_ISSUER, "sub": who, "aud": DEV_AUDIENCE, "iat": now, "exp": now + 600}
    key = dev_key()
    return jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": key.kid}, claims, key)


def decided(outcome: str, route: str) -> float:
    """Replay decisions counted so far."""
    return sample("policyroute_replay_decisions_total", route=route, outcome=outcome)


async def test_a_token_is_accepted_once_and_a_token_without_jti_never(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    first = decided("first", "GET /limited")
    async with running(app) as c:
        once = bearer(token(subject()))
        answers = [await c.get("/limited", headers=once) for _ in range(3)]
        bare = await c.get("/limited", headers=bearer(without_jti(subject())))
        # Routes without `replay` take the same token as often as they like.
        plain = [await c.get("/cached/x", headers=once) for _ in range(2)]
    assert [r.status_code for r in answers] == [200, 401, 401]
    assert calls["limited"] == 1
    assert {problem_type(r) for r in answers[1:]} == {"token-replayed"}
    assert challenge(answers[1]) == (
        'Bearer realm="io", error="invalid_token", error_description="the token was already used"'
    )
    assert bare.status_code == 401 and problem_type(bare) == "invalid-token"
    assert "no jti" in bare.json()["detail"] and 'error="invalid_token"' in challenge(bare)
    assert [r.status_code for r in plain] == [200, 200]
    assert decided("first", "GET /limited") == first + 1


async def test_the_record_lasts_until_the_token_can_no_longer_be_accepted(
    policy_dir: Path, valkey_url: str
) -> None:
    app = install(policy_dir, POLICY, valkey_url, Counter())
    who = subject()
    value = token(who, ttl=120)
    claims = jwt.decode(value, dev_key()).claims
    async with running(app) as c:
        assert (await c.get("/limited", headers=bearer(value))).status_code == 200
        store: ValkeyStore = engine(app).services["valkey"]
        key = store.key("j:" + digest(f"{DEV_ISSUER}\0{claims['jti']}"), "jti")
        left = int(await store.command("PTTL", key, operation="test"))
    # exp (120 s from now) plus the 30 s leeway, plus a second: 151 s at most
    assert 148_000 <= left <= 151_000


async def test_a_request_refused_before_its_handler_gives_the_token_back(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    who = subject()
    once = bearer(token(who))
    returned = decided("returned", "POST /charge")
    async with running(app) as c:
        short = await c.post("/charge", headers=once)
        await credits.grant(engine(app).services["valkey"], who, 1)
        paid = await c.post("/charge", headers=once)
        again = await c.post("/charge", headers=once)
    assert [short.status_code, paid.status_code, again.status_code] == [402, 200, 401]
    assert problem_type(again) == "token-replayed"
    assert calls["charge"] == 1
    assert decided("returned", "POST /charge") == returned + 1


async def test_once_the_app_ran_the_token_is_used_whatever_it_answered(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    once = bearer(token(subject()))
    async with running(app) as c:
        invalid = await c.get("/slow?sleep=soon", headers=once)  # FastAPI's 422
        again = await c.get("/slow", headers=once)
    assert invalid.status_code == 422 and again.status_code == 401
    assert problem_type(again) == "token-replayed"
    assert calls["slow"] == 0


async def test_shadow_mode_records_replays_and_refuses_none(
    policy_dir: Path, valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    labels = {"route": "GET /other", "step": "replay", "reason": "token-replayed"}
    before = sample("policyroute_shadow_denials_total", **labels)
    shadow = decided("shadow_replayed", "GET /other")
    once = bearer(token(subject()))
    with caplog.at_level(logging.WARNING, logger="policyroute.shadow"):
        async with running(app) as c:
            answers = [await c.get("/other", headers=once) for _ in range(3)]
            # The real record was never taken: the token is still good where enforced.
            enforced = await c.get("/limited", headers=once)
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert calls["other"] == 3 and enforced.status_code == 200
    assert sample("policyroute_shadow_denials_total", **labels) == before + 2
    assert decided("shadow_replayed", "GET /other") == shadow + 2
    assert "GET /other would be refused by replay (token-replayed, 401)" in caplog.text


def test_a_public_route_cannot_take_one_time_tokens(policy_dir: Path, valkey_url: str) -> None:
    policy = "version: 1\nroutes:\n  GET /limited:\n    public: true\n    replay: jti\n"
    with pytest.raises(ConfigError, match="a public route cannot require replay"):
        install(policy_dir, policy, valkey_url, Counter())


def test_one_time_tokens_need_valkey(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text(POLICY)
    settings = policyroute.Settings(valkey_url=None, key_prefix="t" + uuid.uuid4().hex[:8])
    with pytest.raises(ConfigError, match=r"replay .*needs the valkey backend"):
        policyroute.install(make_app(Counter()), policy_dir, settings=settings)
