"""Authentication: every route that is not `public: true` needs a valid bearer JWT (RFC 6750)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Awaitable
from typing import Final
from urllib.parse import unquote_to_bytes

from ..compile.compiler import Env, register
from ..compile.step import Context, Step
from ..errors import ConfigError, Denial, Finding, Location, Problems
from ..identity.challenge import bearer_challenge
from ..identity.jwks import Fetch, KeysUnavailableError, fetch_jwks
from ..identity.lockout import LockoutGuard
from ..identity.tokens import Authenticator, TokenError, shared_authenticator
from ..language.policy import RoutePolicy
from ..principal import Principal

log = logging.getLogger("policyroute.auth")

# RFC 6750 section 2.1: credentials = "Bearer" 1*SP b64token
_B64TOKEN: Final = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_SCHEME_SLACK = 16  # "Bearer" and the spaces around the token


def _query_names(query: bytes) -> set[bytes]:
    names = (part.partition(b"=")[0].replace(b"+", b" ") for part in query.split(b"&"))
    return {unquote_to_bytes(name) for name in names}


def _as_sent(token: bytes) -> bytes:
    """The Authorization value clients send for `token`: what a verified one is kept under."""
    return b"Bearer " + token


class AuthStep(Step):
    """Verify the bearer token and make its principal the request's caller."""

    name = "auth"

    def __init__(self, authenticator: Authenticator, realm: str) -> None:
        self.authenticator = authenticator
        self.realm = realm
        self.max_header = authenticator.max_bytes + _SCHEME_SLACK
        self._no_token = bearer_challenge(realm)
        # The verified tokens: every request with a token looks there first.
        self._cache = authenticator.cache

    def _remembered(self, token: str | bytes) -> Principal | None:
        """The principal of a token verified before (by what it was remembered under)."""
        cache = self._cache
        return cache.get(token) if cache is not None else None

    def _invalid_request(self, detail: str) -> Denial:
        return Denial(Problems.INVALID_REQUEST, detail,
                      headers=bearer_challenge(self.realm, "invalid_request", detail))

    def _invalid_token(self, detail: str) -> Denial:
        return Denial(Problems.INVALID_TOKEN, detail,
                      headers=bearer_challenge(self.realm, "invalid_token", detail))

    def _token(self, ctx: Context) -> bytes:
        query = ctx.scope.get("query_string", b"")
        if query.find(b"access") >= 0 and b"access_token" in _query_names(query):
            raise self._invalid_request(
                "a token in the query string is refused; send it in the Authorization header")
        values = ctx.authorization
        if not values:
            raise Denial(Problems.UNAUTHENTICATED, "a bearer token is required",
                         headers=self._no_token)
        if len(values) > 1:
            raise self._invalid_request("send exactly one Authorization header")
        raw = values[0]
        if len(raw) > self.max_header:  # before any parsing: a huge header costs nothing more
            limit = self.authenticator.max_bytes
            raise self._invalid_token(f"the token is larger than {limit} bytes")
        scheme, _, token = raw.strip(b" ").partition(b" ")
        if scheme.lower() != b"bearer":
            raise Denial(Problems.UNAUTHENTICATED, "a bearer token is required",
                         headers=self._no_token)
        return token.lstrip(b" ")

    def check_now(self, ctx: Context) -> Awaitable[None] | None:
        """Refuse a missing or malformed token; a token verified before decides at once."""
        values = ctx.authorization
        # `find`, not `in`: `bytes in bytes` first tries the needle as an integer, and
        # raises and clears a TypeError each time (about 2,000 instructions a request).
        if len(values) == 1 and ctx.scope.get("query_string", b"").find(b"access") < 0:
            # Verified tokens are remembered by their header as clients spell it (`_as_sent`):
            # sent that way, a repeat is one lookup, with no parsing of the header.
            principal = self._remembered(values[0])
            if principal is not None:
                return self._admit_cached(ctx, principal)
        raw = self._token(ctx)  # every refusal of the header, in order
        # Spelled otherwise, the token is found under the one spelling it is remembered by:
        # one valid token takes one place, however often its spelling changes.
        principal = self._remembered(_as_sent(raw))
        if principal is not None:
            return self._admit_cached(ctx, principal)
        if not _B64TOKEN.fullmatch(raw):
            raise self._invalid_request("the Authorization header must be `Bearer <token>`")
        return self._verify(ctx, raw.decode("latin-1"))

    async def _verify(self, ctx: Context, token: str) -> None:
        """Verify a token not seen before (signature, claims; keys may be fetched)."""
        try:
            principal = await self.authenticator.authenticate(
                token, ctx.client, _as_sent(token.encode("latin-1")))
            ctx.note("auth", "verified")  # a signature checked (a cached token is not)
        except TokenError as exc:
            # The reason only: never the token, never a claim value.
            log.debug("policyroute: %s refused a bearer token: %s", ctx.route, exc)
            raise self._invalid_token(str(exc)) from None
        except KeysUnavailableError as exc:
            # Not the caller's fault: nothing here can tell a good token from a bad one yet.
            raise Denial(Problems.KEYS_UNAVAILABLE,
                         "the keys that verify this token cannot be obtained right now; "
                         "try again shortly",
                         headers={"Retry-After": str(exc.retry_after)}) from None
        self._admit(ctx, principal)

    @staticmethod
    def _admit(ctx: Context, principal: Principal) -> None:
        if principal.client != ctx.client:
            principal = dataclasses.replace(principal, client=ctx.client)
        ctx.set_principal(principal)

    def _admit_cached(self, ctx: Context, principal: Principal) -> Awaitable[None] | None:
        """A token verified before: admitted at once, returning None (a lockout's override
        checks the caller first and returns what to await)."""
        self._admit(ctx, principal)
        return None

    def describe(self) -> str:
        """One line for explain."""
        issuers = ", ".join(self.authenticator.issuers)
        keyed = self.authenticator.accounts.describe()
        return (f"bearer JWT from {issuers} (realm {self.realm!r}); "
                f"per-principal state keyed by {keyed}")

    def start(self) -> None:
        """Keep the issuers' key sets fresh in the background."""
        self.authenticator.start()

    async def stop(self) -> None:
        """Stop refreshing the key sets."""
        await self.authenticator.stop()


class LockoutAuthStep(AuthStep):
    """`AuthStep` under `settings.auth.lockout`: failed tokens counted, blocked callers refused.

    A token verified before is checked against the blocks (one Valkey call); a token not
    seen before is an attempt, counted while it is verified and settled after (two calls,
    the second queued). Routes of a policy set without `lockout` keep the plain step.
    """

    def __init__(self, authenticator: Authenticator, realm: str, lockout: LockoutGuard) -> None:
        super().__init__(authenticator, realm)
        self.lockout = lockout
        # Tokens being verified now, by client address: the same token sent again from the
        # same address meanwhile (a client's parallel requests) waits for that outcome, so
        # it is one attempt per process.
        self._flights: dict[tuple[str, str | None], asyncio.Future[Principal]] = {}

    def _admit_cached(self, ctx: Context, principal: Principal) -> Awaitable[None] | None:
        return self._admit_checked(ctx, principal)

    async def _admit_checked(self, ctx: Context, principal: Principal) -> None:
        await self.lockout.admit(ctx, principal.account)
        self._admit(ctx, principal)

    async def _verify(self, ctx: Context, token: str) -> None:
        key = (token, ctx.client)
        while (flight := self._flights.get(key)) is not None:
            try:
                principal = await asyncio.shield(flight)
            except asyncio.CancelledError:
                if flight.cancelled():
                    continue  # the request verifying it went away: verify it here
                raise
            except Denial as denial:
                raise Denial(denial.problem, denial.detail, headers=denial.headers) from None
            self._admit(ctx, principal)
            return
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        try:
            await self._attempt(ctx, token)
        except Denial as denial:
            flight.set_exception(denial)
            flight.exception()  # retrieved: nobody may be waiting for it
            raise
        except BaseException:
            flight.cancel()
            raise
        else:
            flight.set_result(ctx.principal)
        finally:
            del self._flights[key]

    def _verified(self, ctx: Context, token: str) -> Awaitable[None]:
        # `AuthStep._verify`, for the lockout to count (no two-argument super in a lambda:
        # the compiled module does not allow it)
        return super()._verify(ctx, token)

    async def _attempt(self, ctx: Context, token: str) -> None:
        """Verify a token not seen before as one counted attempt."""
        await self.lockout.counted(
            ctx,
            self.authenticator.claimed_account(token),
            lambda: self._verified(ctx, token),
            Problems.INVALID_TOKEN,
        )

    def describe(self) -> str:
        """One line for explain."""
        return f"{super().describe()}; {self.lockout.describe()}"


def _settings_finding(code: str, message: str) -> ConfigError:
    where = ("settings", "auth", "issuers")
    return ConfigError([Finding(code, message, Location("<settings>"), where)])


def make_auth(policy: RoutePolicy, env: Env) -> Step | None:
    """An auth step for every route that is not public."""
    if policy.public:
        return None
    auth = env.settings.auth
    if not auth.issuers:
        raise _settings_finding(
            "no-issuer",
            "routes that are not `public: true` need a bearer token, but settings.auth.issuers "
            "names no issuer to verify it; add one or mark the routes public")
    fetch: Fetch = env.services.get("jwks_fetcher") or fetch_jwks
    try:
        authenticator = shared_authenticator(auth, fetch)
    except ValueError as exc:
        raise _settings_finding("invalid-key-source", str(exc)) from None
    if auth.lockout is not None:
        store = env.service("valkey", "settings.auth.lockout (failures counted across workers)")
        enforce = policy.enforce and auth.lockout.enforce
        guard = LockoutGuard(store, auth.lockout, enforce=enforce, step="auth")
        return LockoutAuthStep(authenticator, auth.realm, guard)
    return AuthStep(authenticator, auth.realm)


register(("auth",), make_auth)
