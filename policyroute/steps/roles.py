"""`roles`: the principal must hold at least one listed role."""

from __future__ import annotations

from collections.abc import Sequence

from ..compile.compiler import Env, register
from ..compile.step import Context, Step
from ..errors import Denial, Problems
from ..language.policy import RoutePolicy


class RolesStep(Step):
    """Refuse with 403 when the principal holds none of the roles."""

    name = "roles"
    traced = False  # an in-memory check: named on the request span, no span of its own

    def __init__(self, roles: Sequence[str]) -> None:
        self.roles = tuple(dict.fromkeys(roles))
        self.allowed = frozenset(self.roles)

    def check_now(self, ctx: Context) -> None:
        """Deny unless one of the roles was granted."""
        if self.allowed.isdisjoint(ctx.principal.roles):
            raise Denial(Problems.FORBIDDEN_ROLE,
                         "the caller has none of the roles this route requires",
                         extra={"required_roles": list(self.roles)})

    def describe(self) -> str:
        """One line for explain."""
        return "any of " + ", ".join(self.roles)


def make_roles(policy: RoutePolicy, env: Env) -> Step | None:
    """A roles step when the policy lists roles."""
    if not policy.roles:
        return None
    return RolesStep(policy.roles)


register(("roles",), make_roles)
