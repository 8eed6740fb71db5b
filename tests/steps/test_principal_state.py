"""State is kept per whole identity: issuer and subject (and tenant), never `sub` alone.

A token from a second trusted issuer that carries the same `sub` as a user of the first
is another principal: it gets none of that user's cached responses, idempotent replays,
credits, rate-limit buckets or concurrency slots. The servers are real (uvicorn, Valkey).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from policyroute.cli import main
from policyroute.identity.dev import DEV_ISSUER
from tests.servers import Served, uvicorn

from .identity_kit import PARTNER_ISSUER, SETTINGS, bearer, subject, token, two_issuer_settings
from .stateful import engine, install, running

ROUTES = """\
routes:
  GET /cached/{item}:
    cache: {ttl: 60s}
  POST /jobs:
    idempotency: {required: true}
  GET /charge:
    credits: {cost: 1}
  GET /limited:
    rate_limit: {key: user, capacity: 2, refill: 1, per: 60s}
  GET /slow:
    rate_limit: {key: user, algorithm: concurrency, capacity: 1}
"""


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy set trusting two issuers."""
    found = tmp_path_factory.mktemp("two-issuers")
    (found / "routes.yaml").write_text(f"version: 1\n{two_issuer_settings()}{ROUTES}")
    return found


@pytest.fixture(scope="module")
def served(policies: Path, valkey_url: str) -> Iterator[Served]:
    """One uvicorn on that policy set, for every test of the module."""
    with uvicorn(policies, valkey_url) as server:
        yield server


@pytest.fixture
def cli(served: Served, policies: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`policyroute` commands on the server's policy set and Valkey keys."""
    monkeypatch.setenv("POLICYROUTE_POLICIES", str(policies))
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", valkey_url)
    monkeypatch.setenv("POLICYROUTE_KEY_PREFIX", served.prefix)


def victim_and_impostor(who: str) -> tuple[dict[str, str], dict[str, str]]:
    """The first issuer's user `who`, and a second-issuer token with the same `sub`."""
    return bearer(token(who)), bearer(token(who, issuer=PARTNER_ISSUER))


def test_the_same_sub_of_another_issuer_gets_no_cached_response(served: Served) -> None:
    victim, impostor = victim_and_impostor(subject())
    with httpx.Client(base_url=served.base) as c:
        mine = c.get("/cached/statement", headers=victim)
        again = c.get("/cached/statement", headers=victim)
        theirs = c.get("/cached/statement", headers=impostor)
        theirs_again = c.get("/cached/statement", headers=impostor)
    assert [r.status_code for r in (mine, again, theirs, theirs_again)] == [200] * 4
    assert again.headers.get("x-cache") == "hit" and again.json() == mine.json()
    assert "x-cache" not in theirs.headers  # before: `X-Cache: hit` with the victim's body
    assert theirs.json()["n"] != mine.json()["n"]
    assert theirs_again.headers.get("x-cache") == "hit"  # its own entry
    assert theirs_again.json() == theirs.json()


def test_the_same_sub_of_another_issuer_never_replays_an_idempotent_response(
    served: Served,
) -> None:
    victim, impostor = victim_and_impostor(subject())
    body = {"amount": 100}
    with httpx.Client(base_url=served.base) as c:
        mine = c.post("/jobs", json=body, headers={**victim, "Idempotency-Key": '"pay-1"'})
        theirs = c.post("/jobs", json=body, headers={**impostor, "Idempotency-Key": '"pay-1"'})
        replay = c.post("/jobs", json=body, headers={**victim, "Idempotency-Key": '"pay-1"'})
    assert mine.status_code == theirs.status_code == replay.status_code == 201
    assert "idempotent-replayed" not in theirs.headers  # before: the victim's response
    assert theirs.json()["job"] != mine.json()["job"]
    assert replay.headers["idempotent-replayed"] == "true" and replay.json() == mine.json()


def test_the_same_sub_of_another_issuer_never_spends_the_credits(
    served: Served, cli: None, capsys: pytest.CaptureFixture[str]
) -> None:
    who = subject()
    victim, impostor = victim_and_impostor(who)
    assert main(["credits", "grant", who, "2", "--issuer", DEV_ISSUER]) == 0
    assert capsys.readouterr().out.strip() == f"{who} of {DEV_ISSUER}: balance 2"
    with httpx.Client(base_url=served.base) as c:
        theirs = [c.get("/charge", headers=impostor).status_code for _ in range(2)]
        mine = [c.get("/charge", headers=victim).status_code for _ in range(3)]
    assert theirs == [402, 402]  # before: 200 200, paid with the victim's credits
    assert mine == [200, 200, 402]
    for issuer, left in ((DEV_ISSUER, 0), (PARTNER_ISSUER, 0)):
        assert main(["credits", "show", who, "--issuer", issuer]) == 0
        assert capsys.readouterr().out.strip() == f"{who} of {issuer}: balance {left}"


def test_the_same_sub_of_another_issuer_has_its_own_limits_and_slots(served: Served) -> None:
    victim, impostor = victim_and_impostor(subject())
    with httpx.Client(base_url=served.base, timeout=10) as c:
        drained = [c.get("/limited", headers=impostor).status_code for _ in range(3)]
        mine = c.get("/limited", headers=victim)
        statuses: list[int] = []
        held = threading.Thread(
            target=lambda: statuses.append(c.get("/slow?sleep=1.5", headers=victim).status_code)
        )
        held.start()
        time.sleep(0.5)  # the victim's request holds its only slot
        theirs = c.get("/slow", headers=impostor)
        held.join()
    assert drained == [200, 200, 429]
    assert mine.status_code == 200  # before: 429, the impostor drained the victim's bucket
    assert theirs.status_code == 200  # before: 429 concurrency-limited
    assert statuses == [200]


def test_the_commands_name_a_principal_only_as_the_routes_do(
    cli: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    who = subject()
    refused = {
        "no issuer": ["credits", "grant", who, "1"],
        "unknown issuer": ["credits", "grant", who, "1", "--issuer", "https://nobody.example/"],
        "no tenant claim": ["credits", "show", who, "--issuer", DEV_ISSUER, "--tenant", "acme"],
        "mfa, no issuer": ["mfa", "enrol", who],
        "--ip with an issuer": ["credits", "show", "10.0.0.1", "--ip", "--issuer", DEV_ISSUER],
    }
    for why, argv in refused.items():
        assert main(argv) == 2, why
    err = capsys.readouterr().err
    assert f"several issuers ({DEV_ISSUER}, {PARTNER_ISSUER})" in err and "--issuer" in err
    assert "not an issuer of the policy settings" in err
    assert "no tenant_claim" in err
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("POLICYROUTE_POLICIES", str(tmp_path / "empty"))
    assert main(["credits", "show", who]) == 2  # never a guess at the name
    assert "POLICYROUTE_POLICIES" in capsys.readouterr().err


# -- a tenant claim and claims a cache entry varies by ----------------------------------

TENANT_ROUTES = """\
routes:
  GET /cached/{item}:
    cache: {ttl: 60s}
  GET /charge:
    credits: {cost: 1}
  POST /jobs:
    idempotency: {required: true}
"""


def of(who: str, **claims: Any) -> dict[str, str]:
    """A dev token of `who` with extra claims."""
    return bearer(token(who, extra=claims))


async def test_a_tenant_claim_keeps_one_subjects_tenants_apart(
    policy_dir: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    calls: Counter[str] = Counter()
    settings = SETTINGS + "    tenant_claim: org.id\n"
    app = install(policy_dir, f"version: 1\n{settings}{TENANT_ROUTES}", valkey_url, calls)
    monkeypatch.setenv("POLICYROUTE_POLICIES", str(policy_dir))
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", valkey_url)
    monkeypatch.setenv("POLICYROUTE_KEY_PREFIX", engine(app).config.key_prefix)
    who = subject()
    acme, globex = of(who, org={"id": "acme"}), of(who, org={"id": "globex"})
    assert await asyncio.to_thread(main, ["credits", "grant", who, "1"]) == 2  # which tenant?
    assert "--tenant" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["credits", "grant", who, "1", "--tenant", "acme"]) == 0
    assert capsys.readouterr().out.strip() == f'{who} in tenant "acme": balance 1'
    async with running(app) as c:
        cached = [await c.get("/cached/report", headers=h) for h in (acme, globex, acme)]
        charged = [(await c.get("/charge", headers=h)).status_code for h in (globex, acme)]
        key = {"Idempotency-Key": '"k"'}
        jobs = [await c.post("/jobs", json={}, headers={**h, **key}) for h in (acme, globex)]
    assert [r.headers.get("x-cache") for r in cached] == [None, None, "hit"]
    assert cached[1].json()["n"] != cached[0].json()["n"]
    assert charged == [402, 200]  # the credits are acme's
    assert "idempotent-replayed" not in jobs[1].headers
    assert jobs[1].json()["job"] != jobs[0].json()["job"]


VARY = """\
routes:
  GET /cached/{item}:
    cache: {ttl: 60s, vary_claims: [org_id, team]}
  GET /other:
    cache: {ttl: 60s, shared: true, acknowledge_shared: true, vary_claims: [org_id]}
"""


async def test_cache_entries_vary_by_the_claims_the_policy_names(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, f"version: 1\n{SETTINGS}{VARY}", valkey_url, calls)
    who = subject()
    asked = [
        of(who, org_id="acme", team="red"),
        of(who, org_id="globex", team="red"),
        of(who, org_id="acme", team="red"),
        # Values that run together when joined: still two entries.
        of(who, org_id="a,b", team="c"),
        of(who, org_id="a", team="b,c"),
        of(who, org_id=1, team=None),
        of(who, org_id="1", team=None),
        of(who),  # no such claims: an entry of its own
    ]
    async with running(app) as c:
        private = [(await c.get("/cached/x", headers=h)).headers.get("x-cache") for h in asked]
        shared = [
            (await c.get("/other", headers=of(name, org_id=org))).headers.get("x-cache")
            for name, org in ((subject(), "acme"), (subject(), "acme"), (subject(), "globex"))
        ]
    assert private == [None, None, "hit", None, None, None, None, None]
    assert calls["cached"] == 7
    assert shared == [None, "hit", None]  # one entry per organization, whoever asks
