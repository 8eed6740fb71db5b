"""The client address, resolved once per request when trusted proxies are configured."""

from __future__ import annotations

from ..compiler import Env, register
from ..identity.client import ClientResolver
from ..policy import RoutePolicy
from .base import Context, Step


class ClientStep(Step):
    """Replace the socket peer with the client that trusted proxies forwarded for."""

    name = "client"
    traced = False  # an in-memory check: named on the request span, no span of its own

    def __init__(self, resolver: ClientResolver) -> None:
        self.resolver = resolver

    def check_now(self, ctx: Context) -> None:
        """Set `ctx.client`, which the IP allowlist, the principal and rate-limit keys read."""
        ctx.client = self.resolver.resolve(ctx.client, ctx.scope["headers"])

    def describe(self) -> str:
        """One line for explain."""
        proxies = ", ".join(str(n) for n in self.resolver.trusted)
        return f"{self.resolver.header.decode()} read right to left past trusted proxies {proxies}"


def make_client(policy: RoutePolicy, env: Env) -> Step | None:
    """A client step only when some proxy is trusted; otherwise the socket peer is the client."""
    settings = env.settings
    if not settings.trusted_proxies:
        return None
    return ClientStep(ClientResolver(settings.trusted_proxies, settings.forwarded_header))


register(("client",), make_client)
