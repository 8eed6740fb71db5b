"""The authenticated caller, as handlers see it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from starlette.requests import Request

from .errors import Denial, Problems

SCOPE_KEY: Final = "policyroute.principal"


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
    # The name its state is kept under (credits, limits, records, cache, TOTP): see `Accounts`.
    account: str | None = None

    def __post_init__(self) -> None:
        if self.account is None and self.subject is not None:
            object.__setattr__(self, "account", account_name(self.subject))

    @property
    def authenticated(self) -> bool:
        """True when a verified token named a subject."""
        return self.subject is not None


ANONYMOUS: Final = Principal(subject=None)


def account_name(subject: str, scope: tuple[str | None, Any] | None = None) -> str:
    """The name a principal's state is kept under: the subject, or its issuer and tenant too.

    `scope` is (issuer, tenant claim value), or None for the short form (the subject alone,
    one issuer and no tenant claim). The scope is JSON-encoded before it is hashed, so no
    two scopes share a name; the subject follows the fixed-length digest, readable.
    """
    if scope is None:
        return subject
    encoded = json.dumps(list(scope), separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(encoded.encode()).hexdigest()[:32] + ":" + subject


def subject_tag(account: str) -> str:
    """The hash tag of an authenticated principal's keys: `s:<account>`."""
    return "s:" + account


def address_tag(client: str | None) -> str:
    """The hash tag of an anonymous caller's keys: `ip:<client address>`."""
    return "ip:" + (client or "-")


def principal(request: Request) -> Principal:
    """FastAPI dependency: the principal the route's policy established."""
    found = request.scope.get(SCOPE_KEY)
    if found is None:
        # Only reachable when a route escaped the policy gate: refuse rather than guess.
        raise Denial(Problems.NO_POLICY, "this route is not governed by a policy")
    assert isinstance(found, Principal)
    return found
