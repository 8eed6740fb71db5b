"""The client address: resolved once per request, and refused when the server rewrote it.

Uvicorn (and gunicorn's uvicorn workers) rewrite `scope["client"]` from X-Forwarded-For by
default, trusting any peer on loopback. The policy's `trusted_proxies` is then overruled
before any step runs, and the address that was really connected is lost. The signal that
this happened: the request's X-Forwarded-For names the very address the server reports as
its peer (a proxy appends the address of *its* peer, never its own). On a route that reads
the address (an IP allowlist, rate limits, credits) the step then refuses with
`client-address-rewritten` and logs one error per process naming the fix: `--no-proxy-headers`,
or `--forwarded-allow-ips` left empty so the policy's `trusted_proxies` decides.

Limits: a client that lists its own address in X-Forwarded-For is refused too (it harms
only itself); a server that rewrites the address from a header other than X-Forwarded-For
is not detected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ..compile.compiler import Env, register
from ..compile.step import Context, Step
from ..errors import Denial, Problems
from ..identity.client import ClientResolver, parse_address, xff_hops
from ..language.policy import RoutePolicy

log = logging.getLogger("policyroute")
_XFF = b"x-forwarded-for"
_FIX = (
    "the server rewrote the client address from X-Forwarded-For before the policy could "
    "decide whom to trust: run uvicorn with --no-proxy-headers (or --forwarded-allow-ips '') "
    "and list your proxies in settings.trusted_proxies"
)
_logged = [False]


def rewritten(peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the server's peer address is one X-Forwarded-For names (a proxy-header rewrite)."""
    if peer is None:
        return False
    address = None
    for name, value in headers:
        if name == _XFF:
            if address is None:
                address = parse_address(peer)
                if address is None:
                    return False
            if any(parse_address(hop) == address for hop in xff_hops(value)):
                return True
    return False


class ClientStep(Step):
    """Refuse a rewritten peer; then replace it with the client trusted proxies forwarded for."""

    name = "client"
    traced = False  # an in-memory check: named on the request span, no span of its own

    def __init__(self, resolver: ClientResolver | None) -> None:
        self.resolver = resolver

    def check_now(self, ctx: Context) -> None:
        """Set `ctx.client`, which the IP allowlist, the principal and rate-limit keys read."""
        headers = ctx.scope["headers"]
        if ctx.forwarded and rewritten(ctx.client, headers):
            if not _logged[0]:
                _logged[0] = True
                log.error("policyroute: %s (route %s; logged once)", _FIX, ctx.route)
            raise Denial(Problems.CLIENT_ADDRESS_REWRITTEN, _FIX)
        if self.resolver is not None:
            ctx.client = self.resolver.resolve(ctx.client, headers)

    def describe(self) -> str:
        """One line for explain."""
        guard = "a peer address the server rewrote from X-Forwarded-For is refused"
        if self.resolver is None:
            return guard
        proxies = ", ".join(str(n) for n in self.resolver.trusted)
        header = self.resolver.header.decode()
        return f"{header} read right to left past trusted proxies {proxies}; {guard}"


def make_client(policy: RoutePolicy, env: Env) -> Step | None:
    """A client step where trusted proxies are set or the route reads the client address."""
    settings = env.settings
    lockout = settings.auth.lockout is not None and not policy.public
    reads_address = bool(policy.ip_allowlist or policy.rate_limit or policy.credits or lockout)
    if not settings.trusted_proxies:
        return ClientStep(None) if reads_address else None
    return ClientStep(ClientResolver(settings.trusted_proxies, settings.forwarded_header))


register(("client",), make_client)
