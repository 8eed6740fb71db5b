"""The authenticated caller, as handlers see it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from .errors import Denial, Problems

SCOPE_KEY = "policyroute.principal"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: subject, scopes, roles, claims, client address, authentication time."""

    subject: str | None
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)
    client: str | None = None
    auth_time: float | None = None
    issuer: str | None = None
    acr: str | None = None
    amr: frozenset[str] = frozenset()
    expires_at: float | None = None

    @property
    def authenticated(self) -> bool:
        """True when a verified token named a subject."""
        return self.subject is not None


ANONYMOUS = Principal(subject=None)


def principal(request: Request) -> Principal:
    """FastAPI dependency: the principal the route's policy established."""
    found = request.scope.get(SCOPE_KEY)
    if found is None:
        # Only reachable when a route escaped the policy gate: refuse rather than guess.
        raise Denial(Problems.NO_POLICY, "this route is not governed by a policy")
    assert isinstance(found, Principal)
    return found
