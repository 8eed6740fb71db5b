"""JWKS key sources: loaded from a file or URL, refreshed on an unknown kid at most once per interval."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import pytest
from joserfc.jwk import OctKey, RSAKey

from policyroute.identity.jwks import MAX_JWKS_BYTES, KeySource, fetch_jwks, parse_jwks


def jwks(*kids: str) -> bytes:
    """A JWKS with one fresh RSA key per kid."""
    keys = [RSAKey.generate_key(2048, parameters={"kid": kid}).as_dict(private=False)
            for kid in kids]
    return json.dumps({"keys": keys}).encode()


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fetch:
    """A fetcher serving a sequence of JWKS documents and counting calls."""

    def __init__(self, *documents: bytes | Exception) -> None:
        self.documents = list(documents)
        self.calls = 0

    def __call__(self, location: str) -> bytes:
        self.calls += 1
        doc = self.documents[min(self.calls, len(self.documents)) - 1]
        if isinstance(doc, Exception):
            raise doc
        return doc


async def test_an_unknown_kid_refreshes_at_most_once_per_interval() -> None:
    clock, fetch = Clock(), Fetch(jwks("a"), jwks("a", "b"))
    source = KeySource("https://idp.test/jwks", 300, fetch, clock)
    assert await source.get("a") is not None  # first use loads the set
    assert fetch.calls == 1
    clock.now += 10
    assert await source.get("b") is None  # unknown, but refreshed 10 s ago: no fetch
    assert await source.get("b") is None
    assert fetch.calls == 1
    clock.now += 300
    assert await source.get("b") is not None  # rotated in; one refresh found it
    assert fetch.calls == 2


async def test_concurrent_unknown_kids_share_one_fetch() -> None:
    clock = Clock()
    calls = 0
    document = jwks("a")

    def slow_fetch(location: str) -> bytes:
        nonlocal calls
        calls += 1
        time.sleep(0.05)
        return document

    source = KeySource("https://idp.test/jwks", 300, slow_fetch, clock)
    found = await asyncio.gather(*(source.get("a") for _ in range(20)))
    assert all(k is not None for k in found)
    assert calls == 1


@pytest.mark.parametrize("kid", ["has space", "x" * 200, "tab\tkid", "ünïcode"])
async def test_an_implausible_kid_never_fetches(kid: str) -> None:
    clock, fetch = Clock(), Fetch(jwks("a"))
    source = KeySource("https://idp.test/jwks", 300, fetch, clock)
    await source.get("a")
    clock.now += 10_000
    assert await source.get(kid) is None
    assert fetch.calls == 1


async def test_a_failed_refresh_keeps_the_keys_and_logs_no_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    fetch = Fetch(jwks("a"), ValueError("body: <secret stuff>"))
    source = KeySource("https://idp.test/jwks", 300, fetch, clock)
    await source.get("a")
    clock.now += 301
    with caplog.at_level(logging.WARNING, logger="policyroute.auth"):
        assert await source.get("b") is None
    assert await source.get("a") is not None
    assert "refreshing the JWKS https://idp.test/jwks failed (ValueError)" in caplog.text
    assert "secret stuff" not in caplog.text


async def test_a_token_without_kid_uses_the_only_key() -> None:
    source = KeySource("https://idp.test/jwks", 300, Fetch(jwks("a")), Clock())
    assert await source.get(None) is not None
    two = KeySource("https://idp.test/jwks", 300, Fetch(jwks("a", "b")), Clock())
    assert await two.get(None) is None


def test_symmetric_and_encryption_keys_are_dropped() -> None:
    rsa = RSAKey.generate_key(2048, parameters={"kid": "sig"}).as_dict(private=False)
    enc = RSAKey.generate_key(2048, parameters={"kid": "enc", "use": "enc"}).as_dict(private=False)
    oct_key = OctKey.generate_key(256, parameters={"kid": "oct"}).as_dict(private=True)
    keys = parse_jwks(json.dumps({"keys": [rsa, enc, oct_key]}).encode())
    assert list(keys) == ["sig"]
    with pytest.raises(ValueError, match="no public signature keys"):
        parse_jwks(json.dumps({"keys": [oct_key]}).encode())


def test_a_missing_file_fails_at_load_time_naming_the_file(tmp_path: Path) -> None:
    source = KeySource(str(tmp_path / "nope.json"), 300)
    with pytest.raises(ValueError, match=r"cannot load the JWKS .*nope\.json"):
        source.load_now()


def test_an_oversized_jwks_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_JWKS_BYTES + 1))
    with pytest.raises(ValueError, match="larger than"):
        fetch_jwks(str(big))


def test_an_unreachable_url_is_an_os_error() -> None:
    with pytest.raises(OSError):
        fetch_jwks("https://127.0.0.1:1/jwks.json")
