"""`replay: jti`: one-time tokens. A token's `jti` is accepted once, across workers.

After every guard let the request on (address, token, scopes, roles, MFA), the token's
jti is taken in Valkey with one `SET NX` (its key names the issuer and a digest of the
jti), kept until the token can no longer be accepted: its `exp` plus the leeway, timed
from this process's clock, the one that judged the token. A second request with the same
token, on any worker and on any route that sets `replay`, is answered 401 `token-replayed`
(`WWW-Authenticate: Bearer error="invalid_token"`); a token without a jti is refused on
such a route (401 `invalid-token`).

A request that policyroute refuses after taking the jti and before the route's app is
called (a limit, credits, an idempotency conflict, an open circuit) gives it back, so the
client may try again with the same token; once the app is called (whatever it answers,
FastAPI's 422 included) or a response is served from the cache or an idempotency record,
the token is used. Without Valkey the route answers 503: one-time use cannot be checked.

Shadow mode (`replay: {by: jti, enforce: false}`, or a route's `enforce: false`): jtis are
taken in keys of their own, a would-be refusal is logged and counted, nothing is refused.
"""

from __future__ import annotations

import math
import time
from typing import Any

from starlette.types import Receive, Scope, Send

from .._ids import IDS
from .._types import format_duration
from ..backends.keys import digest
from ..backends.valkey import Store
from ..compile.compiler import Env, register
from ..compile.step import Context, Handler, Step
from ..errors import Denial, Problems, StorageError
from ..identity.challenge import bearer_challenge
from ..language.policy import RoutePolicy
from ..observability.metrics import backend_error
from ..observability.repeats import backend_warning
from ..observability.shadow import shadow_denial

# The record outlives the last moment the token is accepted by this much.
MARGIN_MS = 1000


class ReplayStep(Step):
    """Take the token's jti once; refuse a token whose jti was taken, or that has none."""

    name = "replay"
    guard = False  # around the rest: a refusal before the app gives the jti back

    def __init__(self, store: Store, realm: str, leeway: float, *, enforce: bool = True) -> None:
        self.store = store
        self.leeway = math.ceil(leeway)
        self.enforce = enforce
        self.part = "jti" if enforce else "jtis"
        self._replayed = bearer_challenge(realm, "invalid_token", "the token was already used")
        self._no_jti = bearer_challenge(
            realm, "invalid_token", "this route takes one-time tokens: the token has no jti"
        )

    def describe(self) -> str:
        """One line for explain."""
        shadow = "; shadow: enforce false" if not self.enforce else ""
        return (
            "a token's jti is accepted once (per issuer, until exp + "
            f"{format_duration(self.leeway)} leeway); a token without one is refused{shadow}"
        )

    def _refuse(self, ctx: Context, denial: Denial, outcome: str) -> None:
        if self.enforce:
            ctx.decide("replay", outcome)
            ctx.denied_by = self.name
            raise denial
        ctx.decide("replay", "shadow_" + outcome)
        shadow_denial(ctx, self.name, denial)

    async def around(self, ctx: Context, call_next: Handler) -> None:
        """Take the jti, run the rest; give it back when refused before the app ran."""
        principal = ctx.principal
        jti = principal.claims.get("jti")
        if principal.subject is None:
            # Only a shadowed auth step lets an anonymous caller this far: nothing to take.
            await call_next(ctx)
            return
        if not isinstance(jti, str) or not jti:
            denial = Denial(
                Problems.INVALID_TOKEN,
                "this route takes one-time tokens: the token has no jti",
                headers=self._no_jti,
            )
            self._refuse(ctx, denial, "no_jti")
            await call_next(ctx)
            return
        key = self.store.key("j:" + digest(f"{principal.issuer}\0{jti}"), self.part)
        left = (principal.expires_at or 0.0) + self.leeway - time.time()
        ttl = max(MARGIN_MS, math.ceil(left * 1000) + MARGIN_MS)
        owner = IDS.next()
        try:
            taken = await self.store.run(
                "replay", [key], ["take", owner, ttl], operation="replay take", fail_open=False
            )
        except StorageError as exc:
            backend_error(ctx.route, exc)
            backend_warning(ctx.route, exc, "one-time tokens cannot be checked: ")
            raise Denial(
                Problems.BACKEND_UNAVAILABLE,
                "one-time tokens cannot be checked right now; try again shortly",
                headers={"Retry-After": "1"},
            ) from None
        if not int(taken):
            denial = Denial(
                Problems.TOKEN_REPLAYED, "this one-time token was already used",
                headers=self._replayed,
            )
            self._refuse(ctx, denial, "replayed")
            await call_next(ctx)
            return
        if self.enforce:
            ctx.decide("replay", "first")
        app = ctx.app
        called = _Called(app)
        ctx.app = called
        try:
            await call_next(ctx)
        except Denial:
            if not called.yes:
                await self._give_back(ctx, key, owner)
            raise
        finally:
            ctx.app = app

    async def _give_back(self, ctx: Context, key: str, owner: str) -> None:
        """A request refused before its app ran did not use the token."""
        try:
            await self.store.run(
                "replay", [key], ["back", owner, 0], operation="replay back", fail_open=True
            )
        except StorageError as exc:
            backend_error(ctx.route, exc)
            backend_warning(ctx.route, exc)
            return
        if self.enforce:
            ctx.decide("replay", "returned")


class _Called:
    """The route's app, noting whether it was called."""

    __slots__ = ("app", "yes")

    def __init__(self, app: Any) -> None:
        self.app = app
        self.yes = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.yes = True
        await self.app(scope, receive, send)


def make_replay(policy: RoutePolicy, env: Env) -> Step | None:
    """A replay step when the route takes one-time tokens only."""
    if policy.replay is None or policy.public:
        return None
    store: Store = env.service("valkey", "replay (a jti is accepted once across workers)")
    auth = env.settings.auth
    enforce = policy.enforce and policy.replay.enforce
    return ReplayStep(store, auth.realm, auth.leeway, enforce=enforce)


register(("replay",), make_replay)
