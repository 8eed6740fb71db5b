"""MFA: a fresh step-up claim, or a TOTP code accepted once across workers, with lockout."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from policyroute import ConfigError
from policyroute.backends.valkey import ValkeyStore
from policyroute.cli import main
from policyroute.identity.dev import DEV_ISSUER
from policyroute.identity.totp import STEP_SECONDS, code_at, enrol, revoke

from .identity_kit import (
    PARTNER_ISSUER,
    SETTINGS,
    bearer,
    challenge,
    problem_type,
    serve,
    subject,
    token,
    two_issuer_settings,
    write_policies,
)

ROUTES = """\
  GET /step-up:
    mfa: required
  GET /admin:
    mfa: {methods: [totp]}
  GET /me:
    mfa: {methods: [step_up], max_age: 60s}
"""

LOCKOUT = SETTINGS.replace(
    "realm: io\n", "realm: io\n    totp: {max_failures: 3, lockout: 120s, window: 10m}\n")


@pytest.fixture
async def store(valkey_url: str) -> AsyncIterator[ValkeyStore]:
    """A store on the session's real Valkey, to enrol subjects."""
    s = ValkeyStore(valkey_url)
    try:
        yield s
    finally:
        await s.stop()


def totp(code: str) -> dict[str, str]:
    """The one-time code header."""
    return {"X-TOTP-Code": code}


def wrong_code(secret: str) -> str:
    """A code that matches no step within the drift window."""
    now = time.time()
    near = {code_at(secret, now + k * STEP_SECONDS) for k in (-2, -1, 0, 1, 2)}
    return next(c for c in (f"{n:06d}" for n in range(0, 1_000_000, 7919)) if c not in near)


# -- step-up claims --------------------------------------------------------------------

async def test_without_a_second_factor_the_answer_is_401_step_up(
    policy_dir: Path, valkey_url: str
) -> None:
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        r = await c.get("/step-up", headers=bearer(token()))
    assert r.status_code == 401
    assert problem_type(r) == "mfa-required"
    assert challenge(r).startswith(
        'Bearer realm="io", error="insufficient_user_authentication", error_description=')
    assert 'max_age="900"' in challenge(r)


async def test_a_fresh_amr_claim_is_enough(policy_dir: Path, valkey_url: str) -> None:
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        r = await c.get("/step-up", headers=bearer(token(amr=["pwd", "mfa"])))
    assert r.status_code == 200
    assert r.json()["amr"] == ["mfa", "pwd"]


async def test_a_stale_step_up_is_not_enough(policy_dir: Path, valkey_url: str) -> None:
    write_policies(policy_dir, ROUTES)
    stale = token(amr=["mfa"], now=time.time() - 120, ttl=3600)  # authenticated 2 minutes ago
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        route_max_age = await c.get("/me", headers=bearer(stale))  # max_age: 60s
        default_max_age = await c.get("/step-up", headers=bearer(stale))  # 900 s
    assert route_max_age.status_code == 401
    assert 'error="insufficient_user_authentication"' in challenge(route_max_age)
    assert 'max_age="60"' in challenge(route_max_age)
    assert default_max_age.status_code == 200


async def test_an_auth_time_in_the_future_is_refused_beyond_the_leeway(
    policy_dir: Path, valkey_url: str
) -> None:
    write_policies(policy_dir, ROUTES)
    now = int(time.time())
    ahead = token(amr=["mfa"], extra={"auth_time": now + 86400})  # fresh forever, if taken
    skewed = token(amr=["mfa"], extra={"auth_time": now + 10})  # within the 30 s leeway
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        refused = await c.get("/step-up", headers=bearer(ahead))
        plain_route = await c.get("/me", headers=bearer(ahead))
        accepted = await c.get("/step-up", headers=bearer(skewed))
    for r in (refused, plain_route):
        assert r.status_code == 401
        assert problem_type(r) == "invalid-token"
        assert 'error="invalid_token"' in challenge(r)
        assert r.json()["detail"] == "the token's auth_time is in the future"
    assert accepted.status_code == 200


async def test_an_acr_value_counts_when_configured(policy_dir: Path, valkey_url: str) -> None:
    settings = SETTINGS.replace(
        "realm: io\n", "realm: io\n    step_up: {acr_values: [urn:example:loa:2], amr_values: []}\n")
    write_policies(policy_dir, ROUTES, settings)
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        acr = await c.get("/step-up", headers=bearer(token(acr="urn:example:loa:2")))
        amr = await c.get("/step-up", headers=bearer(token(amr=["mfa"])))
    assert acr.status_code == 200
    assert amr.status_code == 401
    assert 'acr_values="urn:example:loa:2"' in challenge(amr)


async def test_step_up_only_routes_need_no_valkey(policy_dir: Path) -> None:
    write_policies(policy_dir, "  GET /me:\n    mfa: {methods: [step_up]}\n")
    async with serve(policy_dir) as c:
        code = await c.get("/me", headers={**bearer(token()), **totp("123456")})
        fresh = await c.get("/me", headers=bearer(token(amr=["otp"])))
    assert code.status_code == 401
    assert fresh.status_code == 200


async def test_totp_without_valkey_refuses_to_start(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES)
    with pytest.raises(ConfigError) as caught:
        async with serve(policy_dir):
            pass
    assert {f.code for f in caught.value.findings} == {"missing-backend"}


# -- TOTP codes --------------------------------------------------------------------------

async def test_a_code_is_accepted_once(policy_dir: Path, valkey_url: str, store: ValkeyStore) -> None:
    who = subject()
    secret = (await enrol(store, who)).secret
    write_policies(policy_dir, ROUTES)
    code = code_at(secret, time.time())
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        first = await c.get("/step-up", headers={**bearer(token(who)), **totp(code)})
        replay = await c.get("/step-up", headers={**bearer(token(who)), **totp(code)})
    assert first.status_code == 200
    assert replay.status_code == 401
    assert problem_type(replay) == "mfa-invalid"
    assert "already used" in replay.json()["detail"]
    assert code not in replay.text


async def test_totp_only_routes_ignore_step_up_claims(
    policy_dir: Path, valkey_url: str, store: ValkeyStore
) -> None:
    who = subject()
    secret = (await enrol(store, who)).secret
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        claims_only = await c.get("/admin", headers=bearer(token(who, amr=["mfa"])))
        with_code = await c.get("/admin", headers={**bearer(token(who)),
                                                   **totp(code_at(secret, time.time()))})
    assert claims_only.status_code == 401
    assert with_code.status_code == 200


async def test_wrong_and_unenrolled_codes_are_401(
    policy_dir: Path, valkey_url: str, store: ValkeyStore
) -> None:
    who = subject()
    secret = (await enrol(store, who)).secret
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        wrong = await c.get("/step-up", headers={**bearer(token(who)), **totp(wrong_code(secret))})
        garbage = await c.get("/step-up", headers={**bearer(token(who)), **totp("x" * 5000)})
        stranger = await c.get("/step-up", headers={**bearer(token(subject())),
                                                    **totp(code_at(secret, time.time()))})
    for r in (wrong, garbage, stranger):
        assert r.status_code == 401
        assert problem_type(r) == "mfa-invalid"
        assert 'error="insufficient_user_authentication"' in challenge(r)


async def test_failures_lock_the_subject_out_with_429(
    policy_dir: Path, valkey_url: str, store: ValkeyStore
) -> None:
    who = subject()
    secret = (await enrol(store, who)).secret
    write_policies(policy_dir, ROUTES, LOCKOUT)
    headers = bearer(token(who))
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        statuses = [(await c.get("/step-up", headers={**headers, **totp(wrong_code(secret))}))
                    for _ in range(3)]
        right = await c.get("/step-up", headers={**headers, **totp(code_at(secret, time.time()))})
        other = await c.get("/step-up", headers={**bearer(token(subject())), **totp("123456")})
    assert [r.status_code for r in statuses] == [401, 401, 429]
    for r in (statuses[2], right):
        assert r.status_code == 429
        assert problem_type(r) == "mfa-locked"
        assert 110 <= int(r.headers["retry-after"]) <= 120
    assert other.status_code == 401  # the lockout is per subject


async def test_the_same_sub_of_another_issuer_has_its_own_secret_replays_and_lockout(
    policy_dir: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    write_policies(policy_dir, ROUTES, two_issuer_settings(
        "    totp: {max_failures: 3, lockout: 120s, window: 10m}\n"))
    monkeypatch.setenv("POLICYROUTE_POLICIES", str(policy_dir))
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", valkey_url)
    monkeypatch.delenv("POLICYROUTE_KEY_PREFIX", raising=False)
    who = subject()
    assert await asyncio.to_thread(main, ["mfa", "enrol", who, "--issuer", DEV_ISSUER]) == 0
    secret = capsys.readouterr().out.split("secret: ")[1].strip()
    code = code_at(secret, time.time())
    victim, impostor = bearer(token(who)), bearer(token(who, issuer=PARTNER_ISSUER))
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        # The victim's code is nothing to the other issuer's `who`, who enrolled no secret.
        theirs = await c.get("/admin", headers={**impostor, **totp(code)})
        mine = await c.get("/admin", headers={**victim, **totp(code)})
        wrong = [(await c.get("/admin", headers={**impostor, **totp(wrong_code(secret))}))
                 for _ in range(2)]
        again = await c.get("/admin", headers={**victim, **totp(code)})
    assert theirs.status_code == 401 and problem_type(theirs) == "mfa-invalid"  # before: 200
    assert mine.status_code == 200  # before: 401, the impostor had used the code up
    assert [r.status_code for r in wrong] == [401, 429]  # the impostor locked itself out
    assert again.status_code == 401  # before: 429, locked out by the impostor's failures
    assert "already used" in again.json()["detail"]
    assert await asyncio.to_thread(main, ["mfa", "revoke", who, "--issuer", PARTNER_ISSUER]) == 1
    assert await asyncio.to_thread(main, ["mfa", "revoke", who, "--issuer", DEV_ISSUER]) == 0
    assert capsys.readouterr().out.strip() == f"revoked the TOTP secret of {who} of {DEV_ISSUER}"


async def test_a_revoked_secret_no_longer_works(
    policy_dir: Path, valkey_url: str, store: ValkeyStore
) -> None:
    who = subject()
    secret = (await enrol(store, who)).secret
    assert await revoke(store, who) is True
    assert await revoke(store, who) is False
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir, valkey_url=valkey_url) as c:
        r = await c.get("/step-up", headers={**bearer(token(who)),
                                             **totp(code_at(secret, time.time()))})
    assert r.status_code == 401


async def test_enrol_refuses_to_overwrite_unless_asked(store: ValkeyStore) -> None:
    who = subject()
    first = await enrol(store, who)
    with pytest.raises(ValueError, match="already has a TOTP secret"):
        await enrol(store, who)
    second = await enrol(store, who, replace=True)
    assert second.secret != first.secret
    assert second.uri.startswith("otpauth://totp/")
    assert f"secret={second.secret}" in second.uri


class DictSecrets:
    """A pluggable secret source (here: a dict; in practice a database or a vault)."""

    def __init__(self, secrets: dict[str, str]) -> None:
        self.secrets = secrets

    async def totp_secret(self, subject: str) -> str | None:
        """The subject's secret."""
        return self.secrets.get(subject)


async def test_a_pluggable_secret_source(policy_dir: Path, valkey_url: str) -> None:
    who, secret = subject(), "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    write_policies(policy_dir, ROUTES)
    code = code_at(secret, time.time())
    source = DictSecrets({who: secret})
    async with serve(policy_dir, valkey_url=valkey_url, extra_services={"totp_secrets": source}) as c:
        first = await c.get("/step-up", headers={**bearer(token(who)), **totp(code)})
        replay = await c.get("/step-up", headers={**bearer(token(who)), **totp(code)})
    assert first.status_code == 200
    assert replay.status_code == 401  # replay state still lives in Valkey


async def test_valkey_down_fails_closed_with_503(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir, valkey_url="redis://127.0.0.1:1/0") as c:
        r = await c.get("/step-up", headers={**bearer(token()), **totp("123456")})
    assert r.status_code == 503
    assert problem_type(r) == "backend-unavailable"


# -- two processes, one code -------------------------------------------------------------

WORKER = """
import asyncio, sys, time
from pathlib import Path

kit_dir, policy_dir, valkey_url, bearer_token, code, ready, go = sys.argv[1:]
sys.path.insert(0, kit_dir)
import identity_kit
import policyroute
import policyroute.testing

async def main() -> None:
    app = identity_kit.make_app()
    engine = policyroute.install(app, policy_dir, settings=policyroute.Settings(valkey_url=valkey_url))
    async with policyroute.testing.client(app) as client:
        await engine.services["valkey"].ping()  # connected before the start line
        Path(ready).touch()
        deadline = time.monotonic() + 30
        while not Path(go).exists() and time.monotonic() < deadline:
            pass  # spin: both workers leave within microseconds of each other
        r = await client.get("/step-up", headers={"Authorization": "Bearer " + bearer_token,
                                                   "X-TOTP-Code": code})
        print(r.status_code)

asyncio.run(main())
"""


KIT_DIR = str(Path(__file__).resolve().parent)


def race(args: list[str], tmp_path: Path) -> list[int]:
    """Start two workers, release them at once, and return their statuses."""
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, KIT_DIR, *args, str(flag), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for flag in ready
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(f.exists() for f in ready):
            assert time.monotonic() < deadline, "workers did not start"
            assert all(w.poll() is None for w in workers), workers[0].communicate()
            time.sleep(0.01)
        go.touch()
        outputs = [w.communicate(timeout=60) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    return [int(out.strip().splitlines()[-1]) for out, _ in outputs]


async def test_the_same_code_from_two_processes_is_accepted_exactly_once(
    policy_dir: Path, valkey_url: str, store: ValkeyStore, tmp_path: Path
) -> None:
    who = subject()
    secret = (await enrol(store, who)).secret
    write_policies(policy_dir, ROUTES)
    code = code_at(secret, time.time())
    args = [str(policy_dir), valkey_url, token(who), code]
    statuses = await asyncio.to_thread(race, args, tmp_path)
    assert sorted(statuses) == [200, 401]
