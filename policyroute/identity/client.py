"""The client's address: the socket peer, or what trusted proxies say, read right to left."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Only the right end of a forwarding header matters; never read more of it than this.
MAX_FORWARDED_BYTES = 4096
MAX_HOPS = 32


def parse_address(text: str) -> IPAddress | None:
    """An address from `1.2.3.4`, `1.2.3.4:80`, `[::1]:80`, `::1` or `"[::1]"`; None if not one."""
    text = text.strip().strip('"')
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]  # IPv4 with a port
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def xff_hops(raw: bytes) -> list[str]:
    """The hops of X-Forwarded-For values, left to right (only the rightmost part is read)."""
    return [h for h in _tail(raw).split(",") if h.strip()]


def forwarded_hops(raw: bytes) -> list[str]:
    """The `for=` values of RFC 7239 Forwarded elements, left to right."""
    hops: list[str] = []
    for element in _tail(raw).split(","):
        node = "unknown"
        for pair in element.split(";"):
            name, _, value = pair.partition("=")
            if name.strip().lower() == "for":
                node = value.strip()
        hops.append(node)
    return hops


def _tail(raw: bytes) -> str:
    if len(raw) > MAX_FORWARDED_BYTES:
        # Drop the element the cut went through: a partial address must not be read whole.
        raw = raw[-MAX_FORWARDED_BYTES:].partition(b",")[2]
    return raw.decode("latin-1")


class ClientResolver:
    """Finds the client address for a socket peer and the forwarding header of a request."""

    __slots__ = ("_hops", "header", "trusted")

    def __init__(self, trusted: Sequence[IPNetwork], header: str = "x-forwarded-for") -> None:
        self.trusted = tuple(trusted)
        self.header = header.encode("latin-1")
        self._hops = forwarded_hops if header == "forwarded" else xff_hops

    def is_trusted(self, address: IPAddress) -> bool:
        """True when the address belongs to a trusted proxy."""
        return any(address in net for net in self.trusted)

    def resolve(self, peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """The client address; None when a trusted proxy forwarded something that is no address."""
        if peer is None or not self.trusted:
            return peer
        address = parse_address(peer)
        if address is None or not self.is_trusted(address):
            return peer
        raw = b",".join(v for k, v in headers if k.lower() == self.header)
        hops = self._hops(raw)[-MAX_HOPS:]
        if raw.strip() and not hops:
            return None
        client: IPAddress = address
        for hop in reversed(hops):
            found = parse_address(hop)
            if found is None:
                return None  # a proxy we trust forwarded garbage: the client is unknown
            client = found
            if not self.is_trusted(found):
                break
        return str(client)
