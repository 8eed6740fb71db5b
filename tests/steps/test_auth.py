"""Bearer authentication: the RFC 6750 status matrix, the attack set, the principal."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc.jwk import Key, RSAKey

import policyroute
import policyroute.testing
from policyroute import ConfigError
from policyroute.identity.dev import DEV_AUDIENCE, DEV_ISSUER, DEV_KID
from policyroute.identity.tokens import IssuerVerifier

from .identity_kit import (
    DEV_JWKS,
    SETTINGS,
    bearer,
    challenge,
    dev_key,
    make_app,
    problem_type,
    serve,
    token,
    write_policies,
)

ROUTES = """\
  GET /open:
    public: true
  GET /me: {}
  POST /io-job:
    scopes: [run:io_jobs]
    roles: [io_job_runner]
"""

JWKS_URL = "https://keys.example.test/jwks.json"
URL_SETTINGS = SETTINGS.replace(f"jwks: {DEV_JWKS}", f"jwks: {JWKS_URL}")


# -- the RFC 6750 status matrix ---------------------------------------------------------

@pytest.fixture
def policies(policy_dir: Path) -> Path:
    """Policies with one public route, one authenticated and one needing scope and role."""
    return write_policies(policy_dir, ROUTES)


async def test_no_token_is_401_with_a_bare_challenge(policies: Path) -> None:
    async with serve(policies) as c:
        r = await c.get("/me")
    assert r.status_code == 401
    assert challenge(r) == 'Bearer realm="io"'
    assert problem_type(r) == "unauthenticated"


async def test_another_scheme_counts_as_no_bearer_token(policies: Path) -> None:
    async with serve(policies) as c:
        r = await c.get("/me", headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"})
    assert r.status_code == 401
    assert challenge(r) == 'Bearer realm="io"'


@pytest.mark.parametrize("value", [b"Bearer", b"Bearer ", b"Bearer a b", b'Bearer "quoted"',
                                   b"Bearer \xfftoken"])
async def test_malformed_authorization_is_400_invalid_request(policies: Path, value: bytes) -> None:
    async with serve(policies) as c:
        r = await c.get("/me", headers=[(b"Authorization", value)])
    assert r.status_code == 400
    assert challenge(r).startswith('Bearer realm="io", error="invalid_request"')
    assert problem_type(r) == "invalid-request"


async def test_token_in_the_query_string_is_refused(policies: Path) -> None:
    valid = token()
    async with serve(policies) as c:
        only_query = await c.get("/me", params={"access_token": valid})
        also_header = await c.get("/me", params={"access_token": valid}, headers=bearer(valid))
    for r in (only_query, also_header):
        assert r.status_code == 400
        assert 'error="invalid_request"' in challenge(r)
        assert valid not in r.text


async def test_two_authorization_headers_are_400(policies: Path) -> None:
    valid = token()
    headers = [("Authorization", f"Bearer {valid}"), ("Authorization", f"Bearer {valid}")]
    async with serve(policies) as c:
        r = await c.get("/me", headers=headers)
    assert r.status_code == 400
    assert 'error="invalid_request"' in challenge(r)


async def test_a_token_verified_before_is_refused_where_its_header_is(policies: Path) -> None:
    # Verified tokens are remembered by the whole header value: the refusals that do not
    # depend on the token (a token in the query, two headers) still come first.
    valid = token()
    async with serve(policies) as c:
        first = await c.get("/me", headers=bearer(valid))
        in_query = await c.get("/me", params={"access_token": valid}, headers=bearer(valid))
        twice = await c.get("/me", headers=[("Authorization", f"Bearer {valid}")] * 2)
        spaced = await c.get("/me", headers={"Authorization": f"bearer   {valid}"})
        again = await c.get("/me", headers=bearer(valid))
    assert (first.status_code, again.status_code, spaced.status_code) == (200, 200, 200)
    assert first.json() == again.json() == spaced.json()
    for r in (in_query, twice):
        assert r.status_code == 400
        assert 'error="invalid_request"' in challenge(r)


async def test_an_authorization_name_not_in_lower_case_is_no_credential(policies: Path) -> None:
    # ASGI servers hand header names in lower case, and Starlette reads them as given; so
    # does the gate: a name spelled otherwise (a server not following ASGI) is no token.
    app = make_app()
    policyroute.install(app, policies)
    valid = token()

    async def status(name: bytes) -> int:
        sent: list[MutableMapping[str, Any]] = []
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": "/me", "raw_path": b"/me",
                 "root_path": "", "query_string": b"", "client": ("127.0.0.1", 5000),
                 "server": ("testserver", 80),
                 "headers": [(b"host", b"testserver"), (name, f"Bearer {valid}".encode())]}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return int(sent[0]["status"])

    async with policyroute.testing.client(app):
        assert await status(b"authorization") == 200
        assert await status(b"Authorization") == 401


async def test_one_token_takes_one_place_among_verified_tokens_however_it_is_spelled(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Verified tokens are remembered under one spelling of their header: a caller varying
    # the scheme's case or the spaces of one valid token neither makes the server check
    # its signature again nor pushes other callers' tokens out of the (bounded) memory.
    checks: list[str] = []
    check = IssuerVerifier.check_signature

    def counted(self: IssuerVerifier, *args: Any) -> None:
        checks.append(self.name)
        check(self, *args)

    monkeypatch.setattr(IssuerVerifier, "check_signature", counted)
    policies = write_policies(policy_dir, ROUTES, SETTINGS + "    token_cache_size: 3\n")
    victim, attacker = token("victim"), token("mallory")
    spellings = ["Bearer {}", "bearer {}", "BEARER {}", "Bearer  {}", "Bearer {} ", " Bearer {}"]
    async with serve(policies) as c:
        assert (await c.get("/me", headers=bearer(victim))).status_code == 200
        for spelling in spellings:
            r = await c.get("/me", headers={"Authorization": spelling.format(attacker)})
            assert r.status_code == 200
            assert r.json()["subject"] == "mallory"
        again = await c.get("/me", headers=bearer(victim))
    assert again.status_code == 200 and again.json()["subject"] == "victim"
    assert len(checks) == 2  # once for each token


async def test_bad_token_is_401_invalid_token(policies: Path) -> None:
    async with serve(policies) as c:
        r = await c.get("/me", headers=bearer("abc.def.ghi"))
    assert r.status_code == 401
    assert challenge(r).startswith('Bearer realm="io", error="invalid_token", error_description=')
    assert problem_type(r) == "invalid-token"


async def test_missing_scope_is_403_insufficient_scope_naming_the_scope(policies: Path) -> None:
    async with serve(policies) as c:
        r = await c.post("/io-job", headers=bearer(token(roles=["io_job_runner"])))
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in challenge(r)
    assert 'scope="run:io_jobs"' in challenge(r)
    assert problem_type(r) == "insufficient-scope"


async def test_missing_role_is_403(policies: Path) -> None:
    async with serve(policies) as c:
        r = await c.post("/io-job", headers=bearer(token(scopes=["run:io_jobs"])))
    assert r.status_code == 403
    assert problem_type(r) == "forbidden-role"
    assert r.json()["required_roles"] == ["io_job_runner"]


async def test_public_route_needs_no_token(policies: Path) -> None:
    async with serve(policies) as c:
        r = await c.get("/open")
    assert r.status_code == 200
    assert r.json()["subject"] is None


async def test_valid_token_gives_the_handler_its_principal(policies: Path) -> None:
    before = int(time.time())
    valid = token("alice", scopes=["run:io_jobs", "read"], roles=["io_job_runner"])
    async with serve(policies, client="10.20.30.40") as c:
        r = await c.post("/io-job", headers=bearer(valid))
        again = await c.post("/io-job", headers=bearer(valid))
    assert r.status_code == 200
    body = r.json()
    assert body["subject"] == "alice"
    assert body["scopes"] == ["read", "run:io_jobs"]
    assert body["roles"] == ["io_job_runner"]
    assert body["client"] == "10.20.30.40"
    assert body["issuer"] == DEV_ISSUER
    assert body["auth_time"] >= before
    assert again.json() == body  # the cached verification gives the same principal


async def test_oversized_token_is_refused_before_it_is_parsed(policy_dir: Path) -> None:
    settings = SETTINGS.replace("realm: io\n", "realm: io\n    max_token_bytes: 1024\n")
    write_policies(policy_dir, ROUTES, settings)
    big = token(extra={"padding": "x" * 1500})  # validly signed, but too large
    async with serve(policy_dir) as c:
        r = await c.get("/me", headers=bearer(big))
        small = await c.get("/me", headers=bearer(token()))
    assert r.status_code == 401
    assert 'error="invalid_token"' in challenge(r)
    assert "larger than 1024 bytes" in r.json()["detail"]
    assert small.status_code == 200


@pytest.mark.parametrize(("leeway", "status"), [(None, 200), ("2s", 401), ("0s", 401)])
async def test_the_leeway_is_30s_unless_settings_say_otherwise(
    policy_dir: Path, leeway: str | None, status: int
) -> None:
    settings = SETTINGS if leeway is None else SETTINGS.replace(
        "realm: io\n", f"realm: io\n    leeway: {leeway}\n")
    write_policies(policy_dir, ROUTES, settings)
    expired = token(ttl=60, now=time.time() - 65)  # expired 5 seconds ago
    async with serve(policy_dir) as c:
        r = await c.get("/me", headers=bearer(expired))
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["detail"] == "the token has expired"


async def test_routes_need_an_issuer_unless_public(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES, settings="")
    with pytest.raises(ConfigError) as caught:
        async with serve(policy_dir):
            pass
    assert [f.code for f in caught.value.findings] == ["no-issuer"]


# -- the attack set: each is 401 invalid_token, and nothing is fetched --------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _compact(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{_json(header)}.{_json(claims)}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _rs256(key: Key) -> Callable[[bytes], bytes]:
    private = key.private_key
    assert isinstance(private, rsa.RSAPrivateKey)
    return lambda data: private.sign(data, padding.PKCS1v15(), hashes.SHA256())


@functools.cache
def _attacker() -> Key:
    return RSAKey.generate_key(2048, parameters={"kid": "attacker"})


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": "mallory",
                              "iat": now, "nbf": now, "exp": now + 600, "auth_time": now,
                              "scope": "run:io_jobs", "roles": ["io_job_runner"]}
    claims.update(changes)
    return claims


def _header(**changes: Any) -> dict[str, Any]:
    return {"alg": "RS256", "typ": "at+jwt", "kid": DEV_KID, **changes}


def _hs256_with_public_key() -> str:
    public = dev_key().public_key
    assert isinstance(public, rsa.RSAPublicKey)
    public_pem = public.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    return _compact(_header(alg="HS256"), _claims(),
                    lambda data: hmac.new(public_pem, data, hashlib.sha256).digest())


@dataclass(frozen=True)
class Attack:
    """One forged or unacceptable token."""

    name: str
    build: Callable[[str], str]  # takes the URL of a listener an attacker would like us to call
    needs_keys: bool = False  # only a token with a trusted issuer and a plausible kid looks up keys


ATTACKS = [
    Attack("alg none", lambda _: f"{_json(_header(alg='none'))}.{_json(_claims())}."),
    Attack("RS256 to HS256 with the public key as secret", lambda _: _hs256_with_public_key()),
    Attack("embedded jwk", lambda _: _compact(
        _header(kid="attacker", jwk=_attacker().as_dict(private=False)), _claims(),
        _rs256(_attacker()))),
    Attack("foreign jku", lambda url: _compact(_header(kid="attacker", jku=url), _claims(),
                                               _rs256(_attacker()))),
    Attack("foreign x5u", lambda url: _compact(_header(kid="attacker", x5u=url), _claims(),
                                               _rs256(_attacker()))),
    Attack("kid path injection", lambda _: _compact(
        _header(kid="../../../../../../dev/null"), _claims(), _rs256(_attacker())), needs_keys=True),
    Attack("kid sql injection", lambda _: _compact(
        _header(kid="x' UNION SELECT 'secret"), _claims(), _rs256(_attacker())), needs_keys=True),
    Attack("signed by another key under our kid", lambda _: _compact(
        _header(), _claims(), _rs256(_attacker())), needs_keys=True),
    Attack("unknown crit", lambda _: _compact(
        _header(crit=["urn:example:must-understand"], **{"urn:example:must-understand": True}),
        _claims(), _rs256(dev_key()))),
    Attack("wrong iss", lambda _: _compact(_header(), _claims(iss="https://evil.example.com/"),
                                           _rs256(dev_key()))),
    Attack("wrong aud", lambda _: _compact(_header(), _claims(aud="other-api"), _rs256(dev_key()))),
    Attack("expired", lambda _: _compact(
        _header(), _claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        _rs256(dev_key()))),
    Attack("nbf in the future", lambda _: _compact(
        _header(), _claims(nbf=int(time.time()) + 3600), _rs256(dev_key()))),
    Attack("wrong typ", lambda _: _compact(_header(typ="JWT"), _claims(), _rs256(dev_key()))),
    Attack("no exp", lambda _: _compact(
        _header(), {k: v for k, v in _claims().items() if k != "exp"}, _rs256(dev_key()))),
    # The largest the default max_header_bytes (16384) lets through; larger ones are 431.
    Attack("16 KB token", lambda _: "A" * (16384 - len("Bearer "))),
]


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A socket an attacker's jku / x5u points at; it must never see a connection."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.05)
    try:
        yield sock, f"https://127.0.0.1:{sock.getsockname()[1]}/jwks.json"
    finally:
        sock.close()


def _no_connection(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except TimeoutError:
        return True
    conn.close()
    return False


class CountingFetch:
    """The JWKS fetcher of the URL issuer: serves the dev JWKS and counts every call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, location: str) -> bytes:
        self.calls.append(location)
        return DEV_JWKS.read_bytes()


def _assert_invalid_token(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert 'error="invalid_token"' in challenge(r)
    assert problem_type(r) == "invalid-token"


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_attack_is_401_invalid_token_without_any_fetch(
    attack: Attack, policy_dir: Path, listener: tuple[socket.socket, str]
) -> None:
    sock, url = listener
    fetch = CountingFetch()
    write_policies(policy_dir, ROUTES, URL_SETTINGS)
    async with serve(policy_dir, extra_services={"jwks_fetcher": fetch}) as c:
        warm = await c.get("/me", headers=bearer(token()))
        assert warm.status_code == 200 and fetch.calls == [JWKS_URL]
        r = await c.get("/me", headers={"Authorization": f"Bearer {attack.build(url)}"})
    _assert_invalid_token(r)
    assert fetch.calls == [JWKS_URL]  # the attack caused no fetch
    assert _no_connection(sock)


async def test_a_token_over_the_header_limit_is_431_and_never_read(
    policy_dir: Path, listener: tuple[socket.socket, str]
) -> None:
    sock, _ = listener
    fetch = CountingFetch()
    write_policies(policy_dir, ROUTES, URL_SETTINGS)
    async with serve(policy_dir, extra_services={"jwks_fetcher": fetch}) as c:
        r = await c.get("/me", headers={"Authorization": "Bearer " + "A" * 1_000_000})
    assert r.status_code == 431 and problem_type(r) == "header-too-large"
    assert "www-authenticate" not in r.headers
    assert fetch.calls == []
    assert _no_connection(sock)


COLD = [a for a in ATTACKS if not a.needs_keys]


@pytest.mark.parametrize("attack", COLD, ids=[a.name for a in COLD])
async def test_junk_tokens_never_load_keys_even_when_none_are_loaded(
    attack: Attack, policy_dir: Path, listener: tuple[socket.socket, str]
) -> None:
    sock, url = listener
    fetch = CountingFetch()
    write_policies(policy_dir, ROUTES, URL_SETTINGS)
    async with serve(policy_dir, extra_services={"jwks_fetcher": fetch}) as c:
        r = await c.get("/me", headers={"Authorization": f"Bearer {attack.build(url)}"})
    _assert_invalid_token(r)
    assert fetch.calls == []
    assert _no_connection(sock)


async def test_no_token_or_claim_value_reaches_the_logs(
    policies: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret_subject = "subject-that-must-not-be-logged"
    valid = token(secret_subject, scopes=["run:io_jobs"])
    expired = _compact(_header(), _claims(sub=secret_subject, exp=int(time.time()) - 3600,
                                          iat=int(time.time()) - 7200), _rs256(dev_key()))
    forged = _compact(_header(), _claims(sub=secret_subject), _rs256(_attacker()))
    with caplog.at_level(logging.DEBUG):
        async with serve(policies) as c:
            for value in (valid, expired, forged):
                await c.post("/io-job", headers=bearer(value))
    assert caplog.records, "the refusals are logged (reasons only)"
    for value in (valid, expired, forged, secret_subject):
        assert value not in caplog.text
