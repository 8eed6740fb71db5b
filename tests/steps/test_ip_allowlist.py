"""IP allowlist: the client address from the socket, or from trusted proxies only."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyroute import ConfigError

from .identity_kit import SETTINGS, bearer, problem_type, serve, token, write_policies

ROUTES = """\
  GET /open:
    public: true
    ip_allowlist: [10.0.0.0/8, "2001:db8::/32"]
  GET /me:
    ip_allowlist: [127.0.0.1/32, "::1/128", 10.0.0.0/8]
"""

PROXIES = SETTINGS + "  trusted_proxies: [192.168.7.0/24]\n"


@pytest.mark.parametrize("client", ["10.1.2.3", "2001:db8::42", "::ffff:10.9.9.9"])
async def test_clients_inside_the_networks_pass(policy_dir: Path, client: str) -> None:
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir, client=client) as c:
        r = await c.get("/open")
    assert r.status_code == 200


@pytest.mark.parametrize("client", ["192.0.2.1", "2001:db9::1", "not-an-address"])
async def test_clients_outside_the_networks_are_403(policy_dir: Path, client: str) -> None:
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir, client=client) as c:
        r = await c.get("/open")
    assert r.status_code == 403
    assert problem_type(r) == "ip-not-allowed"


async def test_the_allowlist_is_checked_before_the_token(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir, client="192.0.2.1") as c:
        without = await c.get("/me")
        forged = await c.get("/me", headers=bearer("abc.def.ghi"))
    assert without.status_code == forged.status_code == 403


async def test_ipv6_loopback_passes(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir, client="::1") as c:
        r = await c.get("/me", headers=bearer(token()))
    assert r.status_code == 200
    assert r.json()["client"] == "::1"


async def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES, PROXIES)
    spoof = {"X-Forwarded-For": "10.1.2.3", "Forwarded": "for=10.1.2.3"}
    async with serve(policy_dir, client="192.0.2.1") as c:
        r = await c.get("/open", headers=spoof)
    assert r.status_code == 403


async def test_a_trusted_proxy_forwards_the_client_read_right_to_left(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES, PROXIES)
    async with serve(policy_dir, client="192.168.7.10") as c:
        # The client forged the leftmost entry; our proxies appended the right ones.
        allowed = await c.get("/me", headers={
            "X-Forwarded-For": "198.51.100.1, 10.1.2.3, 192.168.7.20", **bearer(token())})
        denied = await c.get("/open", headers={"X-Forwarded-For": "10.1.2.3, 198.51.100.7"})
    assert allowed.status_code == 200
    assert allowed.json()["client"] == "10.1.2.3"  # the principal sees the resolved client
    assert denied.status_code == 403


async def test_forwarded_header_when_configured(policy_dir: Path) -> None:
    settings = PROXIES + "  forwarded_header: forwarded\n"
    write_policies(policy_dir, ROUTES, settings)
    async with serve(policy_dir, client="192.168.7.10") as c:
        v6 = await c.get("/open", headers={"Forwarded": 'for="[2001:db8::7]:4711";proto=https'})
        v4 = await c.get("/open", headers={"Forwarded": "for=192.0.2.60;by=x, for=10.0.0.4"})
        xff_ignored = await c.get("/open", headers={"X-Forwarded-For": "10.1.2.3"})
    assert v6.status_code == 200
    assert v4.status_code == 200
    assert xff_ignored.status_code == 403  # the peer itself is not allowed


async def test_a_huge_forwarded_for_is_read_only_at_its_right_end(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES, PROXIES)
    # As large as the default max_header_bytes (16384) lets through; a larger one is 431.
    huge = ", ".join(["198.51.100.1"] * 1_150) + ", 10.1.2.3"
    assert len(huge) <= 16384
    async with serve(policy_dir, client="192.168.7.10") as c:
        r = await c.get("/open", headers={"X-Forwarded-For": huge})
        over = await c.get("/open", headers={"X-Forwarded-For": "1" * 16385})
    assert r.status_code == 200
    assert over.status_code == 431


@pytest.mark.parametrize(
    "proxies",
    [
        '["0.0.0.0/0"]',
        '["::/0"]',
        '["*"]',
        "[0.0.0.0/1, 128.0.0.0/1]",
        '["::/1", "8000::/1"]',
        # Everything but 10.0.0.0/8: every public address all the same.
        "[0.0.0.0/5, 8.0.0.0/7, 11.0.0.0/8, 12.0.0.0/6, 16.0.0.0/4, 32.0.0.0/3, 64.0.0.0/2, "
        "128.0.0.0/1]",
    ],
)
async def test_trusting_every_address_is_a_config_error(policy_dir: Path, proxies: str) -> None:
    write_policies(policy_dir, ROUTES, SETTINGS + f"  trusted_proxies: {proxies}\n")
    with pytest.raises(ConfigError, match="trust"):
        async with serve(policy_dir):
            pass


async def test_an_empty_allowlist_allows_no_one(policy_dir: Path) -> None:
    write_policies(policy_dir, "  GET /open:\n    public: true\n    ip_allowlist: []\n")
    async with serve(policy_dir, client="127.0.0.1") as c:
        r = await c.get("/open")
    assert r.status_code == 403
