"""Bearer JWT verification with joserfc: trusted issuers, their keys, claims, and a cache.

Every check that can be decided from the settings is built once here (registries, key
sources, claim readers); a repeat token costs one cache lookup.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import ClaimError, ExpiredTokenError, InvalidClaimError, JoseError
from joserfc.jwk import Key, OctKey

from ..errors import PolicyrouteError
from ..language.policy import AuthSettings, Issuer
from ..principal import Principal
from .accounts import Accounts
from .claims import claim_reader, number
from .jwks import Fetch, KeySource, fetch_jwks
from .token_cache import TokenCache

# Header parameters that would let a token name its own key or change the signing input.
# RFC 8725 section 3.10: keys come from configuration only, never from the token.
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c", "b64")
_HMAC_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_CLAIM_MESSAGES = {
    "nbf": "the token is not valid yet",
    "iat": "the token was issued in the future",
    "aud": "the token is not meant for this service",
    "iss": "the token's issuer is not trusted",
    "exp": "the token has no valid expiry",
    "sub": "the token has no valid subject",
    "auth_time": "the token's auth_time is in the future",
}
# Only the size checks of this registry are used, before the issuer is known.
_EXTRACT = jws.JWSRegistry(strict_check_header=False)


class TokenError(PolicyrouteError):
    """A bearer token was refused; the message never contains the token or a claim value."""


class _Claims(jwt.JWTClaimsRegistry):
    """joserfc's claim checks, plus OpenID Connect's `auth_time`: never in the future."""

    def validate_auth_time(self, value: object) -> None:
        """Refuse an authentication time later than now plus the leeway (a step-up forever)."""
        # Another type or a non-finite number is ignored (it never makes a step-up fresh).
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if isinstance(value, float) and not math.isfinite(value):
            return
        if value > self.now + self.leeway:
            raise InvalidClaimError("auth_time", "The authentication time is in the future")


def _media_type(typ: str) -> str:
    typ = typ.lower()
    return typ.removeprefix("application/")


def _secret_key(issuer: Issuer) -> OctKey:
    name = issuer.secret_env or ""
    secret = os.environ.get(name, "")
    need = max(_HMAC_BYTES[a] for a in issuer.algorithms)
    if len(secret.encode()) < need:
        # The message names the variable, never the value.
        raise ValueError(f"environment variable {name} must hold an HMAC secret of at least "
                         f"{need} bytes for {', '.join(issuer.algorithms)} "
                         "(it is unset or shorter)")
    return OctKey.import_key(secret.encode())


class IssuerVerifier:
    """One trusted issuer: its algorithm allow-list, its keys and its claim checks."""

    def __init__(self, issuer: Issuer, leeway: float, fetch: Fetch = fetch_jwks) -> None:
        self.name = issuer.issuer
        self.algorithms = frozenset(issuer.algorithms)
        self.registry = jws.JWSRegistry(algorithms=list(issuer.algorithms),
                                        strict_check_header=False)
        audiences = [issuer.audience] if isinstance(issuer.audience, str) else list(issuer.audience)
        self.claims = _Claims(
            leeway=math.ceil(leeway),
            iss={"essential": True, "value": issuer.issuer},
            aud={"essential": True, "values": audiences},
            exp={"essential": True},
            sub={"essential": True},
        )
        self.static: Key | None = None
        self.source: KeySource | None = None
        if issuer.jwks is None:
            self.static = _secret_key(issuer)
        else:
            refresh = issuer.jwks_refresh
            self.source = KeySource(issuer.jwks, refresh.min, refresh.max, fetch)
            if not issuer.jwks.startswith("https://"):
                self.source.load_now()  # a bad file stops the start, not the first request

    def precheck(self, header: Mapping[str, Any], claims: dict[str, Any]) -> None:
        """Refuse what needs no key: an algorithm not allowed, a bad `aud`, `exp`, `nbf`..."""
        # Checking claims before the signature only ever rejects (acceptance still needs
        # the signature), and a junk token then costs no key lookup and no fetch.
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenError("the token's algorithm is not accepted")
        try:
            self.claims.validate(claims)
        except ExpiredTokenError:
            raise TokenError("the token has expired") from None
        except ClaimError as exc:
            message = _CLAIM_MESSAGES.get(exc.claim, "a required claim is missing or invalid")
            raise TokenError(message) from None
        except (JoseError, TypeError, ValueError):
            raise TokenError("a required claim is missing or invalid") from None

    async def key_for(self, header: Mapping[str, Any]) -> Key | None:
        """The configured key that should verify a token with this header."""
        if self.static is not None:
            return self.static
        kid = header.get("kid")
        if (kid is not None and not isinstance(kid, str)) or self.source is None:
            return None
        return await self.source.get(kid)  # KeysUnavailableError when no set was ever obtained

    def check_signature(self, obj: jws.CompactSignature, key: Key) -> None:
        """Verify the signature with joserfc; raise TokenError when it does not hold."""
        if key.alg is not None and key.alg != obj.headers().get("alg"):
            raise TokenError("the token's algorithm does not match its key")
        try:
            valid = jws.validate_compact(obj, key, registry=self.registry)
        except (JoseError, ValueError, TypeError):
            valid = False
        if not valid:
            raise TokenError("the token signature is not valid")


class Authenticator:
    """Verifies bearer tokens of the configured issuers; remembers verified ones until `exp`."""

    def __init__(self, auth: AuthSettings, fetch: Fetch = fetch_jwks) -> None:
        self.settings = auth
        self.fetch = fetch
        self.max_bytes = auth.max_token_bytes
        self.issuers = {i.issuer: IssuerVerifier(i, auth.leeway, fetch) for i in auth.issuers}
        self.typ = _media_type(auth.require_typ) if auth.require_typ else None
        self._scopes = claim_reader(auth.scopes_claim, split=True)
        self._roles = claim_reader(auth.roles_claim, split=False)
        self._amr = claim_reader("amr", split=False)
        self.accounts = Accounts(auth)
        self.cache = TokenCache(auth.token_cache_size) if auth.token_cache_size else None
        for source in self.sources():
            if self.cache is not None:
                source.on_removed = self.cache.forget

    def sources(self) -> list[KeySource]:
        """The JWKS of every issuer that has one."""
        return [v.source for v in self.issuers.values() if v.source is not None]

    def start(self) -> None:
        """Keep every loaded JWKS fresh in the background of the running loop."""
        for source in self.sources():
            source.start()

    async def stop(self) -> None:
        """Stop the background refreshes."""
        for source in self.sources():
            await source.stop()

    def cached(self, token: str | bytes) -> Principal | None:
        """The principal of a token verified before (by what it was remembered under)."""
        return self.cache.get(token) if self.cache is not None else None

    def claimed_account(self, token: str) -> str | None:
        """The account a token names before it is verified (a lockout counts failures by it).

        None unless the token parses, names a trusted issuer and has a string `sub`.
        """
        try:
            obj = jws.extract_compact(token.encode("ascii"), registry=_EXTRACT)
            claims = json.loads(obj.payload)
        except (JoseError, ValueError, TypeError, RecursionError):
            return None
        if not isinstance(claims, dict):
            return None
        issuer, subject = claims.get("iss"), claims.get("sub")
        if not isinstance(issuer, str) or issuer not in self.issuers:
            return None
        if not isinstance(subject, str) or not subject:
            return None
        return self.accounts.of_claims(claims, issuer)

    async def authenticate(
        self, token: str, client: str | None = None, remember: str | bytes | None = None
    ) -> Principal:
        """The principal of a valid token; raise TokenError otherwise.

        It is remembered under `remember` (by default the token): the auth step names the
        Authorization value clients send for it, so a repeat skips parsing the header too.
        """
        name = token if remember is None else remember
        principal = self.cached(name)
        if principal is None:
            principal, key = await self._verify(token, client)
            if self.cache is not None:
                self.cache.put(name, principal, key)
        return principal

    async def _verify(self, token: str, client: str | None) -> tuple[Principal, Key]:
        if len(token) > self.max_bytes:
            raise TokenError(f"the token is larger than {self.max_bytes} bytes")
        try:
            obj = jws.extract_compact(token.encode("ascii"), registry=_EXTRACT)
            claims = json.loads(obj.payload)
        except (JoseError, ValueError, TypeError, RecursionError):
            raise TokenError("the token is not a signed JWT") from None
        header = obj.headers()
        self._check_header(header)
        if not isinstance(claims, dict):
            raise TokenError("the token is not a signed JWT")
        issuer = claims.get("iss")
        verifier = self.issuers.get(issuer) if isinstance(issuer, str) else None
        if verifier is None:
            raise TokenError("the token's issuer is not trusted")
        verifier.precheck(header, claims)
        key = await verifier.key_for(header)
        if key is None:
            raise TokenError("no trusted key matches the token")
        verifier.check_signature(obj, key)
        return self._principal(claims, verifier.name, client), key

    def _check_header(self, header: Mapping[str, Any]) -> None:
        if any(name in header for name in _FORBIDDEN_HEADERS):
            raise TokenError("the token names its own key or encoding; "
                             "only configured keys are used")
        if "crit" in header:
            raise TokenError("the token has critical header parameters "
                             "this service does not support")
        if self.typ is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or _media_type(typ) != self.typ:
                raise TokenError(f"the token is not of type {self.typ}")

    def _principal(self, claims: dict[str, Any], issuer: str, client: str | None) -> Principal:
        acr = claims.get("acr")
        return Principal(
            subject=claims["sub"],
            scopes=self._scopes(claims),
            roles=self._roles(claims),
            claims=MappingProxyType(claims),
            client=client,
            auth_time=number(claims, "auth_time"),
            issuer=issuer,
            acr=acr if isinstance(acr, str) else None,
            amr=self._amr(claims),
            expires_at=number(claims, "exp"),
            account=self.accounts.of_claims(claims, issuer),
        )


# Weak: an authenticator lives as long as the chains that use it (a reload drops it, and
# its background refreshes end); while it lives it holds its settings, so ids stay unique.
_SHARED: weakref.WeakValueDictionary[tuple[int, int], Authenticator] = (
    weakref.WeakValueDictionary())


def shared_authenticator(auth: AuthSettings, fetch: Fetch = fetch_jwks) -> Authenticator:
    """One authenticator per settings object: the routes of a policy set share keys and cache."""
    memo_key = (id(auth), id(fetch))
    found = _SHARED.get(memo_key)
    if found is not None and found.settings is auth and found.fetch is fetch:
        return found
    authenticator = Authenticator(auth, fetch)
    _SHARED[memo_key] = authenticator
    return authenticator
