"""`mfa: required`: a fresh step-up claim (acr / amr) or a one-time code, checked once."""

from __future__ import annotations

import logging
import time

from .._types import format_duration
from ..compile.compiler import Env, register
from ..compile.step import Context, Step
from ..errors import Denial, Problems, StorageError
from ..identity.challenge import bearer_challenge
from ..identity.lockout import LockoutGuard
from ..identity.totp import (
    MAX_CODE_BYTES,
    SecretSource,
    TotpGuard,
)
from ..language.policy import RoutePolicy, StepUp
from ..observability.metrics import backend_error
from ..observability.repeats import backend_warning
from ..principal import Principal

log = logging.getLogger("policyroute.auth")


class MfaStep(Step):
    """Let the request on after a recent step-up or a valid TOTP code; else 401 (RFC 9470)."""

    name = "mfa"

    def __init__(self, realm: str, max_age: float, step_up: StepUp | None,
                 totp: TotpGuard | None, header: str, *, enforce: bool = True,
                 lockout: LockoutGuard | None = None) -> None:
        # Shadow mode (enforce false): the chain records a refusal instead of raising it,
        # and a code is verified without being used up or counted as a failure.
        self.enforce = enforce
        self.max_age = max_age
        self.acr = frozenset(step_up.acr_values) if step_up else frozenset()
        self.amr = frozenset(step_up.amr_values) if step_up else frozenset()
        self.step_up = step_up is not None
        self.totp = totp
        self.header = header
        # settings.auth.lockout: a code is an attempt, counted per address and subject.
        self.lockout = lockout
        self._header_bytes = header.encode("latin-1")
        params = {"max_age": str(int(max_age))}
        if self.acr:
            params["acr_values"] = " ".join(sorted(self.acr))
        ways = [w for w, on in (("a fresh step-up token", self.step_up),
                                (f"a one-time code in {header}", totp is not None)) if on]
        self._required = "this route needs a second factor: " + " or ".join(ways)
        self._challenge = bearer_challenge(realm, "insufficient_user_authentication",
                                           self._required, **params)

    def fresh(self, principal: Principal, now: float) -> bool:
        """True when the token shows a recent enough acr/amr step-up."""
        if principal.auth_time is None or now - principal.auth_time > self.max_age:
            return False
        return principal.acr in self.acr or not self.amr.isdisjoint(principal.amr)

    async def check(self, ctx: Context) -> None:
        """Pass on a fresh step-up; else check the code header; else ask for step-up."""
        principal = ctx.principal
        if self.step_up and self.fresh(principal, time.time()):
            return
        if self.totp is not None and principal.subject is not None:
            values = ctx.header_values(self._header_bytes)
            if values:
                if self.lockout is None:
                    await self._check_code(principal, values, ctx.route)
                else:
                    await self._counted(ctx, principal, values)
                return
        raise Denial(Problems.MFA_REQUIRED, self._required, headers=self._challenge)

    async def _counted(self, ctx: Context, who: Principal, values: list[bytes]) -> None:
        """`_check_code` as one lockout attempt: a wrong or reused code is a failure."""
        assert self.lockout is not None
        await self.lockout.counted(
            ctx, who.account, lambda: self._check_code(who, values, ctx.route), Problems.MFA_INVALID
        )

    async def _check_code(self, who: Principal, values: list[bytes], route: str) -> None:
        assert self.totp is not None
        # Never parse more than a code can be; anything else is simply a wrong code.
        raw = values[0] if len(values) == 1 and len(values[0]) <= MAX_CODE_BYTES else b""
        code = raw.decode("latin-1").strip()
        try:
            if not self.enforce:
                await self._verify_only(who, code)
                return
            result = await self.totp.check(who, code)
        except StorageError as exc:
            backend_error(route, exc)
            backend_warning(route, exc, "one-time codes cannot be checked: ", log)
            raise Denial(Problems.BACKEND_UNAVAILABLE,
                         "the one-time code cannot be checked right now; try again shortly",
                         headers={"Retry-After": "5"}) from None
        if result.accepted:
            return
        if result.locked:
            raise Denial(Problems.MFA_LOCKED, "too many wrong one-time codes; try again later",
                         headers={"Retry-After": str(result.retry_after)})
        detail = ("this one-time code was already used; wait for the next one"
                  if result.reason == "replayed" else "the one-time code is not valid")
        raise Denial(Problems.MFA_INVALID, detail, headers=self._challenge)

    async def _verify_only(self, who: Principal, code: str) -> None:
        """Shadow mode: is the code right now? Nothing is recorded (no use, no failure)."""
        assert self.totp is not None
        result = await self.totp.peek(who, code)
        if result.locked:
            raise Denial(Problems.MFA_LOCKED, "too many wrong one-time codes; try again later")
        if not result.accepted:
            raise Denial(Problems.MFA_INVALID, "the one-time code is not valid")

    def describe(self) -> str:
        """One line for explain."""
        ways = []
        if self.step_up:
            claims = [f"{name} {', '.join(sorted(values))}"
                      for name, values in (("amr", self.amr), ("acr", self.acr)) if values]
            claims.append(f"at most {format_duration(self.max_age)} old")
            ways.append(f"a step-up claim ({'; '.join(claims)})")
        if self.totp is not None:
            code = (f"a TOTP code in {self.header}, each accepted once, lockout after "
                    f"{self.totp.settings.max_failures} failures")
            if self.lockout is not None:
                code += " (a wrong code also counts toward settings.auth.lockout)"
            ways.append(code)
        return " or ".join(ways)


def make_mfa(policy: RoutePolicy, env: Env) -> Step | None:
    """An MFA step when the policy requires it; TOTP needs Valkey for replay and lockout state."""
    if policy.mfa is None:
        return None
    auth = env.settings.auth
    max_age = policy.mfa.max_age if policy.mfa.max_age is not None else auth.step_up.max_age
    totp = None
    if "totp" in policy.mfa.methods:
        store = env.service("valkey", "mfa (one-time codes are accepted once across workers)")
        secrets: SecretSource | None = env.services.get("totp_secrets")
        totp = TotpGuard(store, auth.totp, secrets)
    step_up = auth.step_up if "step_up" in policy.mfa.methods else None
    enforce = policy.enforce and policy.mfa.enforce
    lockout = None
    if totp is not None and auth.lockout is not None:
        lockout = LockoutGuard(totp.store, auth.lockout, enforce=enforce and auth.lockout.enforce,
                               step="mfa")
    return MfaStep(auth.realm, max_age, step_up, totp, auth.totp.header,
                   enforce=enforce, lockout=lockout)


register(("mfa",), make_mfa)
