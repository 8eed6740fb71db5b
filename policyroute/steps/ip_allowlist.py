"""`ip_allowlist`: only clients from the listed IPv4 / IPv6 networks may call the route."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ..compile.compiler import Env, register
from ..compile.step import Context, Step
from ..errors import Denial, Problems
from ..identity.client import IPNetwork, parse_address
from ..language.policy import RoutePolicy

_MEMO_MAX: Final = 4096


class IpAllowlistStep(Step):
    """Refuse clients outside the allowed networks with 403."""

    name = "ip_allowlist"
    traced = False  # an in-memory check: named on the request span, no span of its own

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._seen: dict[str | None, bool] = {}

    def allows(self, client: str | None) -> bool:
        """True when the client address is inside one of the networks."""
        known = self._seen.get(client)
        if known is None:
            address = parse_address(client) if client is not None else None
            known = address is not None and any(address in net for net in self.networks)
            if len(self._seen) >= _MEMO_MAX:
                self._seen.clear()
            self._seen[client] = known
        return known

    def check_now(self, ctx: Context) -> None:
        """Deny a client outside the allowlist (also one whose address is unknown)."""
        if not self.allows(ctx.client):
            raise Denial(Problems.IP_NOT_ALLOWED, "the client address is not allowed on this route")

    def describe(self) -> str:
        """One line for explain."""
        if not self.networks:
            return "no address is allowed"
        return "allow " + ", ".join(str(n) for n in self.networks)


def make_ip_allowlist(policy: RoutePolicy, env: Env) -> Step | None:
    """An allowlist step when the policy names networks (an empty list allows no one)."""
    if policy.ip_allowlist is None:
        return None
    return IpAllowlistStep(policy.ip_allowlist)


register(("ip_allowlist",), make_ip_allowlist)
