"""`scopes`: the token must carry every listed scope (RFC 6750 insufficient_scope)."""

from __future__ import annotations

from collections.abc import Sequence

from ..compile.compiler import Env, register
from ..compile.step import Context, Step
from ..errors import Denial, Problems
from ..identity.challenge import bearer_challenge
from ..language.policy import RoutePolicy


class ScopesStep(Step):
    """Refuse with 403 when the principal lacks any required scope."""

    name = "scopes"
    traced = False  # an in-memory check: named on the request span, no span of its own

    def __init__(self, scopes: Sequence[str], realm: str) -> None:
        self.scopes = tuple(dict.fromkeys(scopes))
        self.required = frozenset(self.scopes)
        detail = "the token lacks a scope this route requires"
        self._headers = bearer_challenge(realm, "insufficient_scope", detail,
                                         scope=" ".join(self.scopes))
        self._detail = detail

    def check_now(self, ctx: Context) -> None:
        """Deny unless every required scope was granted."""
        if not self.required <= ctx.principal.scopes:
            raise Denial(Problems.INSUFFICIENT_SCOPE, self._detail, headers=self._headers,
                         extra={"required_scopes": list(self.scopes)})

    def describe(self) -> str:
        """One line for explain."""
        return "all of " + ", ".join(self.scopes)


def make_scopes(policy: RoutePolicy, env: Env) -> Step | None:
    """A scopes step when the policy lists scopes."""
    if not policy.scopes:
        return None
    return ScopesStep(policy.scopes, env.settings.auth.realm)


register(("scopes",), make_scopes)
