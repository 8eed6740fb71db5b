"""The store's key names: remembered for the callers that repeat, bounded for the rest."""

from __future__ import annotations

import hashlib

import pytest

from policyroute.backends import keys, valkey
from policyroute.backends.valkey import ValkeyStore


def test_key_names_are_remembered_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every caller's key is spelled the same however often it is asked for, and a stream
    of new callers (one key each, as a scan of accounts or addresses makes) never grows the
    memo past its bound."""
    monkeypatch.setattr(valkey, "KEY_MEMO", 100)
    store = ValkeyStore("redis://127.0.0.1:1", prefix="pr")
    assert store.key("s:alice", "credits") == "pr:{s:alice}:credits"
    assert store.key("a{b}", "tb", "r1", "0") == "pr:{a%7Bb%7D}:tb:r1:0"
    for n in range(1_000):
        assert store.key(f"ip:10.0.{n // 256}.{n % 256}", "rl", "r1", "0") == (
            f"pr:{{ip:10.0.{n // 256}.{n % 256}}}:rl:r1:0"
        )
        assert len(store._keys) <= 100
    assert store.key("s:alice", "credits") == "pr:{s:alice}:credits"


def test_long_paths_are_digested_but_not_remembered() -> None:
    """A stream of long unique paths (a cached route with a path parameter) leaves nothing
    of them in memory; short ones are remembered; both digest as `digest` does."""
    keys._short_path_digest.cache_clear()
    for n in range(200):
        path = f"/items/{n:0300d}"
        assert keys.path_digest(path) == keys.digest(path)
    assert keys._short_path_digest.cache_info().currsize == 0
    assert keys.path_digest("/items/1") == keys.digest("/items/1")
    assert keys._short_path_digest.cache_info().currsize == 1


def test_a_long_tag_is_spelled_but_not_remembered() -> None:
    store = ValkeyStore("redis://127.0.0.1:1", prefix="pr")
    tag = "s:" + "x" * 5000
    assert store.key(tag, "credits") == "pr:{" + tag + "}:credits"
    assert store._keys == {}


def test_a_tag_memo_makes_each_tag_once_within_a_bound() -> None:
    """A caller's keys are made once and handed back as the same object; a stream of new
    callers never grows the memo past its bound, and a very long tag is never kept."""
    made: list[str] = []

    def make(tag: str) -> str:
        made.append(tag)
        return "key of " + tag

    memo = keys.TagMemo(make, bound=100)
    first = memo.get("s:alice")
    assert first == "key of s:alice" and memo.get("s:alice") is first
    assert made == ["s:alice"]
    for n in range(1_000):
        assert memo.get(f"ip:10.0.{n // 256}.{n % 256}") == f"key of ip:10.0.{n // 256}.{n % 256}"
        assert len(memo) <= 100
    long = "s:" + "x" * (keys.TAG_MEMO_LONGEST + 1)
    assert memo.get(long) == "key of " + long and memo.get(long) == "key of " + long
    assert made.count(long) == 2


def test_key_digests_are_sha256_so_every_version_names_the_same_keys() -> None:
    """Keys a running version wrote are found by the next (a rolling deploy, a restart):
    the digests in key names are SHA-256, whichever implementation computes them."""
    assert keys.digest("GET\0q=1") == hashlib.sha256(b"GET\0q=1").hexdigest()[:32]
    assert keys.digest(b"\xff\x00") == hashlib.sha256(b"\xff\x00").hexdigest()[:32]
    assert keys.digest("caf\u00e9") == hashlib.sha256("caf\u00e9".encode()).hexdigest()[:32]
    assert keys.route_id("GET /items/{id}") == hashlib.sha256(b"GET /items/{id}").hexdigest()[:12]
