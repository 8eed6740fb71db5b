"""The authenticated caller, as handlers see it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from .errors import Denial, Problems

if TYPE_CHECKING:
    from .language.policy import AuthSettings

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
    # The name its state is kept under (credits, limits, records, cache, TOTP): see `Accounts`.
    account: str | None = None

    def __post_init__(self) -> None:
        if self.account is None and self.subject is not None:
            object.__setattr__(self, "account", account_name(self.subject))

    @property
    def authenticated(self) -> bool:
        """True when a verified token named a subject."""
        return self.subject is not None


ANONYMOUS = Principal(subject=None)


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


class Accounts:
    """How the settings name principals in state keys (one instance per auth settings).

    One issuer and no `tenant_claim`: the subject alone (`alice`, the short form). Several
    issuers, or a `tenant_claim`: issuer, tenant and subject (`account_name`), so the same
    `sub` from another issuer, or of another tenant, never shares credits, limits,
    idempotency records, cached responses or TOTP state.
    """

    __slots__ = ("_tenant", "issuers", "qualified", "tenant_claim")

    def __init__(self, auth: AuthSettings) -> None:
        from .identity.claims import claim_value

        self.issuers = tuple(i.issuer for i in auth.issuers)
        self.tenant_claim = auth.tenant_claim
        self.qualified = len(self.issuers) > 1 or self.tenant_claim is not None
        self._tenant = claim_value(self.tenant_claim) if self.tenant_claim else None

    def describe(self) -> str:
        """What a per-principal key names, for explain."""
        if not self.qualified:
            return "subject"
        tenant = f"tenant ({self.tenant_claim}), " if self.tenant_claim else ""
        return f"issuer, {tenant}subject"

    def tenant_of(self, claims: Mapping[str, Any]) -> Any:
        """The tenant claim's value in verified claims (None when absent or not configured)."""
        return self._tenant(claims) if self._tenant is not None else None

    def name(self, subject: str, issuer: str | None, tenant: Any = None) -> str:
        """The account of `subject` from `issuer` (of `tenant`, when a tenant claim is set)."""
        if not self.qualified:
            return account_name(subject)
        return account_name(subject, (issuer, tenant if self.tenant_claim else None))

    def of_claims(self, claims: Mapping[str, Any], issuer: str) -> str:
        """The account of a verified token's claims (its `sub` must be a string)."""
        return self.name(str(claims["sub"]), issuer, self.tenant_of(claims))


def principal(request: Request) -> Principal:
    """FastAPI dependency: the principal the route's policy established."""
    found = request.scope.get(SCOPE_KEY)
    if found is None:
        # Only reachable when a route escaped the policy gate: refuse rather than guess.
        raise Denial(Problems.NO_POLICY, "this route is not governed by a policy")
    assert isinstance(found, Principal)
    return found
