"""How much public address space a set of networks covers, judged on their union.

`trusted_proxies` lets any address in it name the client. Judged entry by entry, a list
such as `0.0.0.0/1, 128.0.0.0/1` has no `/0` in it and still trusts every address; judged
on the public space it covers, private ranges (10.0.0.0/8, a VPC) stay as wide as needed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Not reachable from the internet (RFC 6890 special-purpose ranges): this host, private,
# shared (CGNAT), loopback, link-local, IETF protocol, documentation, benchmarking,
# multicast, reserved and broadcast.
_NOT_PUBLIC_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/3",
)
# IPv6 public space is global unicast, less documentation.
_PUBLIC_V6 = ("2000::/3",)
_NOT_PUBLIC_V6 = ("2001:db8::/32",)
# More public addresses than a /16 of the family holds is wide.
WIDE_PREFIX = 16


@dataclass(frozen=True, slots=True)
class PublicCover:
    """The public addresses of one family that a set of networks covers."""

    version: int
    networks: tuple[IPNetwork, ...]  # the union's networks that hold public addresses
    addresses: int
    total: int

    @property
    def everything(self) -> bool:
        """Every public address of the family is covered."""
        return self.addresses >= self.total

    @property
    def wide(self) -> bool:
        """More public addresses than a /16 of the family holds."""
        bits = 32 if self.version == 4 else 128
        return self.addresses > 1 << (bits - WIDE_PREFIX)


def _without(networks: list[IPNetwork], removed: IPNetwork) -> list[IPNetwork]:
    out: list[IPNetwork] = []
    for net in networks:
        if net.version != removed.version or not net.overlaps(removed):
            out.append(net)
        elif removed.subnet_of(net):  # type: ignore[arg-type]
            out.extend(net.address_exclude(removed))  # type: ignore[arg-type]
    return out


@cache
def public_space(version: int) -> tuple[IPNetwork, ...]:
    """The public address space of a family as disjoint networks."""
    start, removed = (
        (("0.0.0.0/0",), _NOT_PUBLIC_V4) if version == 4 else (_PUBLIC_V6, _NOT_PUBLIC_V6)
    )
    space: list[IPNetwork] = [ipaddress.ip_network(n) for n in start]
    for name in removed:
        space = _without(space, ipaddress.ip_network(name))
    return tuple(space)


def _overlap(a: IPNetwork, b: IPNetwork) -> int:
    """Addresses two networks share (CIDR blocks are nested or disjoint)."""
    if a.version != b.version or not a.overlaps(b):
        return 0
    return min(a.num_addresses, b.num_addresses)


def public_cover(networks: Iterable[IPNetwork]) -> list[PublicCover]:
    """Per family present, the public addresses the union of `networks` covers."""
    given = list(networks)
    v4 = [n for n in given if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in given if isinstance(n, ipaddress.IPv6Network)]
    unions: tuple[tuple[int, tuple[IPNetwork, ...]], ...] = (
        (4, tuple(ipaddress.collapse_addresses(v4))),
        (6, tuple(ipaddress.collapse_addresses(v6))),
    )
    found: list[PublicCover] = []
    for version, union in unions:
        if not union:
            continue
        space = public_space(version)
        counts = [(net, sum(_overlap(net, p) for p in space)) for net in union]
        total = sum(p.num_addresses for p in space)
        found.append(
            PublicCover(
                version,
                tuple(net for net, count in counts if count),
                sum(count for _, count in counts),
                total,
            )
        )
    return found
