"""JWKS key sources: loaded from a file or URL, refreshed on an unknown kid at most once per interval."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from joserfc.jwk import OctKey, RSAKey
from pydantic import ValidationError

from policyroute.identity.jwks import (
    MAX_JWKS_BYTES,
    Fetched,
    KeySource,
    KeysUnavailableError,
    fetch_jwks,
    freshness,
    parse_jwks,
)
from policyroute.language.policy import Issuer

URL = "https://idp.test/jwks"


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

    def __init__(self, *documents: bytes | Fetched | Exception) -> None:
        self.documents = list(documents)
        self.calls = 0

    def __call__(self, location: str) -> bytes | Fetched:
        self.calls += 1
        doc = self.documents[min(self.calls, len(self.documents)) - 1]
        if isinstance(doc, Exception):
            raise doc
        return doc


def remote(fetch: Callable[[str], bytes | Fetched], clock: Clock | None = None,
           bounds: tuple[float, float] = (300, 300)) -> KeySource:
    """A source of a JWKS URL, refreshed only when a test asks (no background task)."""
    return KeySource(URL, bounds[0], bounds[1], fetch, clock or Clock(), background=False)


async def test_an_unknown_kid_refreshes_at_most_once_per_interval() -> None:
    clock, fetch = Clock(), Fetch(jwks("a"), jwks("a", "b"))
    source = remote(fetch, clock)
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

    source = remote(slow_fetch, clock)
    found = await asyncio.gather(*(source.get("a") for _ in range(20)))
    assert all(k is not None for k in found)
    assert calls == 1


@pytest.mark.parametrize("kid", ["has space", "x" * 200, "tab\tkid", "ünïcode"])
async def test_an_implausible_kid_never_fetches(kid: str) -> None:
    clock, fetch = Clock(), Fetch(jwks("a"))
    source = remote(fetch, clock)
    await source.get("a")
    clock.now += 10_000
    assert await source.get(kid) is None
    assert fetch.calls == 1


async def test_a_failed_refresh_keeps_the_keys_and_logs_no_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    fetch = Fetch(jwks("a"), ValueError("body: <secret stuff>"))
    source = remote(fetch, clock)
    await source.get("a")
    clock.now += 301
    with caplog.at_level(logging.WARNING, logger="policyroute.auth"):
        assert await source.get("b") is None
    assert await source.get("a") is not None
    assert "refreshing the JWKS https://idp.test/jwks failed (ValueError)" in caplog.text
    assert "secret stuff" not in caplog.text


async def test_a_token_without_kid_uses_the_only_key() -> None:
    source = remote(Fetch(jwks("a")), Clock())
    assert await source.get(None) is not None
    two = remote(Fetch(jwks("a", "b")), Clock())
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


@pytest.mark.parametrize(
    ("cache_control", "age", "expected"),
    [
        ("public, max-age=300", None, 300.0),
        ("max-age=300, must-revalidate", "100", 200.0),
        ('max-age="60"', None, 60.0),
        ("MAX-AGE=60", "600", 0.0),
        ("no-store", None, 0.0),
        ("no-cache, max-age=600", None, 0.0),
        ("public", None, None),
        ("s-maxage=60", None, None),
        ("max-age=soon", None, None),
        (None, "5", None),
    ],
)
def test_freshness_reads_max_age_less_age(
    cache_control: str | None, age: str | None, expected: float | None
) -> None:
    assert freshness(cache_control, age) == expected


@pytest.mark.parametrize(
    ("max_age", "next_in"),
    [(None, 600.0), (5.0, 30.0), (0.0, 30.0), (120.0, 120.0), (86400.0, 600.0)],
)
async def test_the_next_refresh_follows_max_age_within_the_bounds(
    max_age: float | None, next_in: float
) -> None:
    clock = Clock()
    source = remote(Fetch(Fetched(jwks("a"), max_age)), clock, bounds=(30, 600))
    await source.get("a")
    assert source.due == clock.now + next_in


async def test_a_due_refresh_runs_and_reports_removed_keys_only() -> None:
    clock = Clock()
    first = jwks("a", "b")
    keep = json.loads(first)["keys"][0]
    second = json.dumps({"keys": [keep]}).encode()  # the same "a", no "b"
    fetch = Fetch(Fetched(first, 60), Fetched(second, 60))
    source = remote(fetch, clock, bounds=(30, 600))
    removed: list[list[str]] = []
    source.on_removed = lambda keys: removed.append([str(k.kid) for k in keys])
    a = await source.get("a")
    clock.now += 30
    await source.scheduled()  # not due yet: max-age 60
    assert fetch.calls == 1
    clock.now += 30
    await source.scheduled()
    assert fetch.calls == 2
    assert removed == [["b"]]
    assert source.find("a") is a  # an unchanged key stays the same object
    assert source.find("b") is None


async def test_failed_fetches_back_off_up_to_min_and_no_set_is_unavailable() -> None:
    clock = Clock()
    fetch = Fetch(OSError("refused"))
    source = remote(fetch, clock, bounds=(5, 600))
    waits = []
    for _ in range(5):
        with pytest.raises(KeysUnavailableError) as caught:
            await source.get("a")
        waits.append(caught.value.retry_after)
        clock.now = source.due  # the background's next try
    assert waits == [1, 2, 4, 5, 5]
    assert fetch.calls == 5
    with pytest.raises(KeysUnavailableError):
        await source.get(None)  # a token without kid could use the only key of a set
    assert await source.get("not a kid") is None  # never in any set: refused, not 503


async def test_a_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks("a"))
    clock = Clock()
    reads = 0

    def counting(location: str) -> bytes | Fetched:
        nonlocal reads
        reads += 1
        return fetch_jwks(location)

    source = KeySource(str(path), 30, 600, counting, clock, background=False)
    source.load_now()
    for _ in range(3):
        clock.now += 1
        await source.scheduled()
    assert reads == 1
    path.write_bytes(jwks("b"))
    clock.now += 1
    await source.scheduled()
    assert reads == 2
    assert source.find("a") is None and source.find("b") is not None


def test_jwks_refresh_takes_bounds_or_one_duration() -> None:
    def issuer(refresh: object) -> Issuer:
        return Issuer.model_validate({"issuer": "https://idp.test/", "audience": "api",
                                      "jwks": URL, "jwks_refresh": refresh})

    assert (issuer("5m").jwks_refresh.min, issuer("5m").jwks_refresh.max) == (300.0, 300.0)
    bounds = issuer({"min": "1s", "max": "1h"}).jwks_refresh
    assert (bounds.min, bounds.max) == (1.0, 3600.0)
    default = Issuer(issuer="https://idp.test/", audience="api", jwks=URL).jwks_refresh
    assert (default.min, default.max) == (30.0, 600.0)
    with pytest.raises(ValidationError, match="shorter than `min`"):
        issuer({"min": "1h", "max": "1m"})
    with pytest.raises(ValidationError, match="greater than 0"):
        issuer(0)
