"""Which endpoints of an app the policies govern: the engine's deny-by-default checks and
`lint --app` share these, over the endpoints the gate resolves."""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import Finding, Location
from ..language.loader import PolicySet, RouteEntry
from ..language.policy import normalize_path
from .gate import Endpoint


def unpolicied(endpoint: Endpoint, policies: PolicySet) -> list[str]:
    """Methods of an endpoint no policy governs (HEAD only when there is no GET: it follows
    GET); every method of an endpoint the gate does not know."""
    if not endpoint.known:
        return list(endpoint.methods)
    return [
        m
        for m in endpoint.methods
        if policies.get(m, endpoint.path) is None
        and not (m == "HEAD" and "GET" in endpoint.methods)
    ]


def no_policy_finding(route: str) -> Finding:
    """The finding for an app route (METHOD + template) that no policy governs."""
    return Finding(
        "no-policy",
        f"app route {route} has no policy; it is denied with 403 (add a policy or `public: true`)",
        Location("<app>"),
        (),
    )


def unmatched_entries(policies: PolicySet, found: Iterable[Endpoint]) -> list[RouteEntry]:
    """Policy routes that name no endpoint among `found`."""
    served = {(m, normalize_path(e.path)) for e in found if e.known for m in e.methods}
    return [e for k, e in policies.routes.items() if k not in served]
