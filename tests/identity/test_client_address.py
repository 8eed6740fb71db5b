"""Client address resolution: trusted proxies only, forwarding headers read right to left."""

from __future__ import annotations

import ipaddress

import pytest

from policyroute.identity.client import ClientResolver, forwarded_hops, parse_address, xff_hops

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


def resolve(peer: str | None, header: str, value: str, kind: str = "x-forwarded-for") -> str | None:
    """Resolve with one forwarding header."""
    return ClientResolver(TRUSTED, kind).resolve(peer, [(header.encode(), value.encode())])


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    resolver = ClientResolver([])
    assert resolver.resolve("10.1.1.1", [(b"x-forwarded-for", b"1.2.3.4")]) == "10.1.1.1"


def test_an_untrusted_peer_cannot_claim_another_address() -> None:
    assert resolve("203.0.113.9", "x-forwarded-for", "10.1.2.3") == "203.0.113.9"


def test_the_first_untrusted_hop_from_the_right_is_the_client() -> None:
    value = "198.51.100.1, 203.0.113.5, 10.2.2.2"
    assert resolve("10.1.1.1", "x-forwarded-for", value) == "203.0.113.5"


def test_when_every_hop_is_trusted_the_leftmost_is_the_client() -> None:
    assert resolve("10.1.1.1", "x-forwarded-for", "10.3.3.3, 10.2.2.2") == "10.3.3.3"


def test_a_trusted_peer_without_a_header_is_itself_the_client() -> None:
    assert ClientResolver(TRUSTED).resolve("10.1.1.1", []) == "10.1.1.1"


def test_garbage_forwarded_by_a_trusted_proxy_makes_the_client_unknown() -> None:
    assert resolve("10.1.1.1", "x-forwarded-for", "not-an-ip") is None


def test_repeated_header_lines_are_one_list() -> None:
    resolver = ClientResolver(TRUSTED)
    headers = [(b"x-forwarded-for", b"198.51.100.1"), (b"X-Forwarded-For", b"10.9.9.9")]
    assert resolver.resolve("10.1.1.1", headers) == "198.51.100.1"


def test_only_the_configured_header_is_read() -> None:
    both = [(b"forwarded", b"for=198.51.100.1"), (b"x-forwarded-for", b"203.0.113.5")]
    assert ClientResolver(TRUSTED).resolve("10.1.1.1", both) == "203.0.113.5"
    assert ClientResolver(TRUSTED, "forwarded").resolve("10.1.1.1", both) == "198.51.100.1"


def test_rfc7239_forwarded_elements() -> None:
    value = 'for=192.0.2.43, for="[2001:db8:cafe::17]:4711";proto=https;by=10.0.0.1'
    assert forwarded_hops(value.encode()) == ["192.0.2.43", '"[2001:db8:cafe::17]:4711"']
    assert resolve("10.1.1.1", "forwarded", value, "forwarded") == "2001:db8:cafe::17"


def test_ipv6_proxies_and_mapped_addresses() -> None:
    assert resolve("fd00::1", "x-forwarded-for", "::ffff:198.51.100.4") == "198.51.100.4"


def test_huge_headers_are_read_only_at_the_right_end() -> None:
    value = ("198.51.100.1, " * 100_000 + "203.0.113.5").encode()
    assert len(xff_hops(value)) < 400
    assert xff_hops(value)[-1].strip() == "203.0.113.5"
    assert ClientResolver(TRUSTED).resolve("10.1.1.1", [(b"x-forwarded-for", value)]) == "203.0.113.5"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.2.3.4", "1.2.3.4"), ("1.2.3.4:80", "1.2.3.4"), ("[::1]:80", "::1"), ("::1", "::1"),
     ('"[2001:db8::1]"', "2001:db8::1"), ("unknown", None), ("_hidden", None), ("[::1", None)],
)
def test_parse_address(text: str, expected: str | None) -> None:
    found = parse_address(text)
    assert (str(found) if found else None) == expected
