"""How the policy settings name principals in state keys: one place for every key.

A principal is issuer + subject (plus a configured tenant claim) wherever its state is
kept: credits, limits, idempotency records, cached responses, TOTP state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..language.policy import AuthSettings
from ..principal import account_name
from .claims import claim_value


class Accounts:
    """How the settings name principals in state keys (one instance per auth settings).

    One issuer and no `tenant_claim`: the subject alone (`alice`, the short form). Several
    issuers, or a `tenant_claim`: issuer, tenant and subject (`account_name`), so the same
    `sub` from another issuer, or of another tenant, never shares credits, limits,
    idempotency records, cached responses or TOTP state.
    """

    __slots__ = ("_tenant", "issuers", "qualified", "tenant_claim")

    def __init__(self, auth: AuthSettings) -> None:
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
