"""Key sets stay current: a key removed from the issuer's JWKS stops verifying on schedule.

A JWKS URL is served over real HTTPS from the test; a JWKS file is rewritten on disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import Key

from policyroute.identity.dev import DEV_AUDIENCE, DEV_ISSUER, mint

from .identity_kit import bearer, challenge, problem_type, serve, write_policies
from .jwks_server import jwks_bytes, jwks_server, rsa_key

ROUTES = "  GET /me: {}\n"


def settings(jwks: str | Path, refresh: str | None = None) -> str:
    """One issuer with this JWKS and, when given, this `jwks_refresh`."""
    line = f"        jwks_refresh: {refresh}\n" if refresh else ""
    return f"""\
settings:
  auth:
    realm: io
    issuers:
      - issuer: {DEV_ISSUER}
        audience: {DEV_AUDIENCE}
        jwks: {jwks}
{line}"""


async def until(c: httpx.AsyncClient, token: str, status: int, within: float) -> float:
    """Seconds until `GET /me` with `token` answers `status`; fail after `within` seconds."""
    started = time.monotonic()
    while True:
        r = await c.get("/me", headers=bearer(token))
        waited = time.monotonic() - started
        if r.status_code == status:
            return waited
        assert waited < within, f"still {r.status_code} after {waited:.1f}s: {r.text}"
        await asyncio.sleep(0.05)


def assert_refused(r: httpx.Response) -> None:
    """401 invalid_token: no trusted key matches."""
    assert r.status_code == 401, r.text
    assert 'error="invalid_token"' in challenge(r)
    assert problem_type(r) == "invalid-token"


def refresh_tasks(location: str) -> list[asyncio.Task[object]]:
    """The background refreshes of one JWKS still running."""
    return [t for t in asyncio.all_tasks()
            if t.get_name() == f"policyroute-jwks {location}" and not t.done()]


# -- a JWKS URL --------------------------------------------------------------------------

async def test_a_key_removed_from_a_jwks_url_is_refused_when_its_max_age_runs_out(
    policy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = rsa_key("a"), rsa_key("b")
    with jwks_server(tmp_path, monkeypatch) as idp:
        idp.answer(jwks_bytes(a, b), cache_control="public, max-age=1")
        write_policies(policy_dir, ROUTES, settings(idp.url, "{min: 100ms, max: 1h}"))
        old = mint(b, "alice")
        async with serve(policy_dir) as c:
            first = await c.get("/me", headers=bearer(old))
            cached = await c.get("/me", headers=bearer(old))
            assert idp.served() == 1
            idp.answer(jwks_bytes(a), cache_control="public, max-age=1")  # b is revoked
            took = await until(c, old, 401, within=5)
            again = await c.get("/me", headers=bearer(old))
            new_b = await c.get("/me", headers=bearer(mint(b, "bob")))
            new_a = await c.get("/me", headers=bearer(mint(a, "carol")))
            served = idp.served()
            await asyncio.sleep(1.2)
            later = idp.served()
    assert first.status_code == cached.status_code == 200
    assert took < 2.5  # max-age 1s, not the 1h bound
    assert_refused(again)
    assert_refused(new_b)
    assert new_a.status_code == 200
    assert 2 <= served <= 5  # about one fetch a second (and one for b's now unknown kid)
    assert 1 <= later - served <= 2  # the schedule goes on: max-age 1s


@pytest.mark.parametrize(
    ("cache_control", "refresh", "soonest", "latest"),
    [
        ("max-age=86400", "{min: 100ms, max: 1s}", 0.3, 2.5),  # max bounds a long max-age
        (None, "{min: 100ms, max: 1s}", 0.3, 2.5),  # no max-age: max
        ("no-store", "{min: 1500ms, max: 1h}", 1.0, 3.5),  # min bounds a zero max-age
        ("max-age=86400", "1s", 0.3, 2.5),  # one duration: a fixed interval
    ],
)
async def test_the_refresh_interval_is_bounded_by_the_settings(
    policy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    cache_control: str | None, refresh: str, soonest: float, latest: float,
) -> None:
    a, b = rsa_key("a"), rsa_key("b")
    with jwks_server(tmp_path, monkeypatch) as idp:
        idp.answer(jwks_bytes(a, b), cache_control=cache_control)
        write_policies(policy_dir, ROUTES, settings(idp.url, refresh))
        old = mint(b, "alice")
        async with serve(policy_dir) as c:
            assert (await c.get("/me", headers=bearer(old))).status_code == 200
            fetched = time.monotonic()
            idp.answer(jwks_bytes(a), cache_control=cache_control)
            await until(c, old, 401, within=latest + 1)
            took = time.monotonic() - fetched
    assert soonest <= took <= latest


async def test_a_failed_refresh_keeps_the_last_good_keys(
    policy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = rsa_key("a")
    with jwks_server(tmp_path, monkeypatch) as idp:
        idp.answer(jwks_bytes(a), cache_control="max-age=0")
        write_policies(policy_dir, ROUTES, settings(idp.url, "{min: 200ms, max: 1h}"))
        known = mint(a, "alice")
        with caplog.at_level(logging.DEBUG, logger="policyroute.auth"):
            async with serve(policy_dir) as c:
                assert (await c.get("/me", headers=bearer(known))).status_code == 200
                idp.answer(b'{"error": "down for maintenance"}', status=500)
                for _ in range(100):  # 5 s at most
                    if idp.served() >= 4:
                        break
                    await asyncio.sleep(0.05)
                cached = await c.get("/me", headers=bearer(known))
                fresh = await c.get("/me", headers=bearer(mint(a, "bob")))
                unknown = await c.get("/me", headers=bearer(mint(rsa_key("z"), "eve")))
    assert idp.served() >= 4  # refreshes went on, and failed
    assert cached.status_code == fresh.status_code == 200
    assert_refused(unknown)  # a key set is known: an unknown kid is the token's fault
    warnings = [r for r in caplog.records if "refreshing the JWKS" in r.getMessage()
                and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per outage, not once per retry
    assert "(HTTPError)" in warnings[0].getMessage()
    assert "maintenance" not in caplog.text


async def test_no_key_set_at_all_is_503_until_one_is_fetched(
    policy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = rsa_key("a")
    with jwks_server(tmp_path, monkeypatch) as idp:
        idp.answer(b"oops", status=503)
        write_policies(policy_dir, ROUTES, settings(idp.url, "{min: 30s, max: 1h}"))
        valid = mint(a, "alice")
        async with serve(policy_dir) as c:
            down = await c.get("/me", headers=bearer(valid))
            again = await c.get("/me", headers=bearer(valid))
            idp.answer(jwks_bytes(a))
            took = await until(c, valid, 200, within=5)  # retried in the background
    for r in (down, again):
        assert r.status_code == 503, r.text
        assert problem_type(r) == "keys-unavailable"
        assert int(r.headers["retry-after"]) >= 1
        assert "www-authenticate" not in r.headers
    assert took < 3  # after 1s, not after min (30s)


async def test_a_junk_token_never_fetches_and_is_401_even_without_keys(
    policy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with jwks_server(tmp_path, monkeypatch) as idp:
        idp.answer(b"oops", status=503)
        write_policies(policy_dir, ROUTES, settings(idp.url))
        async with serve(policy_dir) as c:
            expired = await c.get("/me", headers=bearer(mint(rsa_key("a"), "x", ttl=-3600)))
    assert_refused(expired)
    assert idp.served() == 0


# -- a JWKS file -------------------------------------------------------------------------

def write_jwks(path: Path, *keys: Key) -> None:
    """Replace the JWKS file at once, as a deployment would."""
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(jwks_bytes(*keys))
    temporary.replace(path)


async def test_a_key_removed_from_a_jwks_file_is_refused_within_seconds(
    policy_dir: Path, tmp_path: Path
) -> None:
    a, b = rsa_key("a"), rsa_key("b")
    path = tmp_path / "jwks.json"
    write_jwks(path, a, b)
    write_policies(policy_dir, ROUTES, settings(path))
    old = mint(b, "alice")
    async with serve(policy_dir) as c:
        assert (await c.get("/me", headers=bearer(old))).status_code == 200
        assert (await c.get("/me", headers=bearer(old))).status_code == 200  # cached
        write_jwks(path, a)
        took = await until(c, old, 401, within=5)
        new_a = await c.get("/me", headers=bearer(mint(a, "carol")))
        write_jwks(path, a, b)  # put back: b verifies again
        back = await until(c, old, 200, within=5)
        assert refresh_tasks(str(path))
    assert took < 3
    assert new_a.status_code == 200
    assert back < 3
    assert not refresh_tasks(str(path))  # shutdown stopped the watch


async def test_a_broken_jwks_file_keeps_the_last_good_keys(
    policy_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = rsa_key("a"), rsa_key("b")
    path = tmp_path / "jwks.json"
    write_jwks(path, a)
    write_policies(policy_dir, ROUTES, settings(path))
    with caplog.at_level(logging.WARNING, logger="policyroute.auth"):
        async with serve(policy_dir) as c:
            assert (await c.get("/me", headers=bearer(mint(a, "alice")))).status_code == 200
            path.write_text('{"keys": [')  # half written
            await asyncio.sleep(1.5)
            during = await c.get("/me", headers=bearer(mint(a, "bob")))
            write_jwks(path, b)
            took = await until(c, mint(b, "carol"), 200, within=5)
    assert during.status_code == 200
    assert took < 3
    assert any("refreshing the JWKS" in r.getMessage() and "keeping 1 keys" in r.getMessage()
               for r in caplog.records)
