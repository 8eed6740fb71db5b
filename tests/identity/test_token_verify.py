"""The authenticator: issuers, HMAC secrets, claim paths, and the verified-token cache."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from policyroute.identity.claims import claim_reader
from policyroute.identity.dev import DEV_AUDIENCE, DEV_ISSUER, load_private_key, mint
from policyroute.identity.tokens import Authenticator, TokenError
from policyroute.language.policy import AuthSettings, Issuer

KEYS = Path(__file__).resolve().parents[2] / "examples" / "keys"
DEV = Issuer(issuer=DEV_ISSUER, audience=DEV_AUDIENCE, jwks=str(KEYS / "dev-jwks.json"))
SECRET = "s" * 40


def dev_token(**kwargs: object) -> str:
    """A token signed with the dev key."""
    return mint(load_private_key(KEYS / "dev-private-jwk.json"), "alice", **kwargs)  # type: ignore[arg-type]


def hs_token(secret: str, issuer: str = "https://hs.example/") -> str:
    """An HS256 token of a shared-secret issuer."""
    now = int(time.time())
    claims = {"iss": issuer, "aud": "io-api", "sub": "svc", "iat": now, "exp": now + 60}
    return jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(secret.encode()), algorithms=["HS256"])


async def test_a_repeat_token_comes_from_the_cache() -> None:
    auth = Authenticator(AuthSettings(issuers=[DEV]))
    token = dev_token()
    first = await auth.authenticate(token)
    assert await auth.authenticate(token) is first


async def test_a_cached_token_still_expires_at_its_exp() -> None:
    auth = Authenticator(AuthSettings(issuers=[DEV], leeway=0))
    token = dev_token(ttl=1)
    principal = await auth.authenticate(token)
    assert principal.expires_at is not None
    await asyncio.sleep(max(0.0, principal.expires_at - time.time()) + 0.05)
    with pytest.raises(TokenError, match="expired"):
        await auth.authenticate(token)


async def test_the_cache_is_bounded() -> None:
    auth = Authenticator(AuthSettings(issuers=[DEV], token_cache_size=2))
    for n in range(5):
        await auth.authenticate(dev_token(extra={"n": n}))
    assert auth.cache is not None and len(auth.cache) == 2
    uncached = Authenticator(AuthSettings(issuers=[DEV], token_cache_size=0))
    assert (await uncached.authenticate(dev_token())).subject == "alice"


async def test_hmac_issuers_take_their_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HS_SECRET", SECRET)
    hs = Issuer(issuer="https://hs.example/", audience="io-api", secret_env="HS_SECRET",
                algorithms=["HS256"])
    auth = Authenticator(AuthSettings(issuers=[DEV, hs]))
    assert (await auth.authenticate(hs_token(SECRET))).issuer == "https://hs.example/"
    with pytest.raises(TokenError, match="signature"):
        await auth.authenticate(hs_token("t" * 40))
    with pytest.raises(TokenError, match="algorithm"):  # the RS issuer never takes HS tokens
        await auth.authenticate(hs_token(SECRET, issuer=DEV_ISSUER))


@pytest.mark.parametrize("value", [None, "tiny"])
def test_a_missing_or_short_secret_fails_at_compile_time_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("HS_SECRET", raising=False)
    else:
        monkeypatch.setenv("HS_SECRET", value)  # "tiny": 4 bytes
    hs = Issuer(issuer="https://hs.example/", audience="io-api", secret_env="HS_SECRET",
                algorithms=["HS256"])
    with pytest.raises(ValueError, match="HS_SECRET must hold an HMAC secret of at least 32") as e:
        Authenticator(AuthSettings(issuers=[hs]))
    assert "tiny" not in str(e.value)


async def test_claims_are_read_only_for_handlers() -> None:
    principal = await Authenticator(AuthSettings(issuers=[DEV])).authenticate(dev_token())
    with pytest.raises(TypeError):
        principal.claims["sub"] = "mallory"  # type: ignore[index]


async def test_required_typ_accepts_the_media_type_form() -> None:
    auth = Authenticator(AuthSettings(issuers=[DEV], require_typ="application/at+jwt"))
    assert (await auth.authenticate(dev_token())).subject == "alice"  # minted with at+jwt


def test_claim_readers_split_once_and_tolerate_odd_shapes() -> None:
    scopes = claim_reader("scope", split=True)
    roles = claim_reader("realm_access.roles", split=False)
    assert scopes({"scope": "a b  c"}) == {"a", "b", "c"}
    assert scopes({"scope": "a\tb\u00a0c d"}) == {"a\tb\u00a0c", "d"}
    assert scopes({"scope": ["a", 1, None, "b"]}) == {"a", "b"}
    assert scopes({"scope": 42}) == frozenset()
    assert roles({"realm_access": {"roles": ["x"]}}) == {"x"}
    assert roles({"realm_access": "x"}) == frozenset()
    assert roles({}) == frozenset()
