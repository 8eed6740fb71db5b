"""The verified-token cache: found by a token's tail, answered only for the whole token."""

from __future__ import annotations

import time
from typing import cast

from joserfc.jwk import Key

from policyroute.identity.token_cache import TAIL, TokenCache
from policyroute.principal import Principal

KEY_A = cast(Key, object())
KEY_B = cast(Key, object())
SIGNATURE = b"x" * TAIL  # both tokens end alike: they share a place in the cache


def _principal(subject: str, ttl: float = 60.0) -> Principal:
    return Principal(subject=subject, expires_at=time.time() + ttl)


def test_a_token_ending_like_a_cached_one_is_never_answered_with_its_principal() -> None:
    cache = TokenCache(8)
    alice, mallory = b"Bearer alice." + SIGNATURE, b"Bearer mallory." + SIGNATURE
    cache.put(alice, _principal("alice"), KEY_A)
    assert cache.get(mallory) is None
    found = cache.get(alice)
    assert found is not None and found.subject == "alice"  # a miss did not evict it


def test_the_later_of_two_tokens_ending_alike_takes_the_place() -> None:
    cache = TokenCache(8)
    first, second = "a." + "s" * TAIL, "b." + "s" * TAIL
    cache.put(first, _principal("first"), KEY_A)
    cache.put(second, _principal("second"), KEY_A)
    assert len(cache) == 1
    assert cache.get(first) is None
    found = cache.get(second)
    assert found is not None and found.subject == "second"


def test_tokens_shorter_than_the_tail_are_kept_whole() -> None:
    cache = TokenCache(8)
    cache.put(b"short", _principal("s"), KEY_A)
    assert cache.get(b"short") is not None
    assert cache.get(b"shor") is None and cache.get(b"xshort") is None


def test_an_expired_token_leaves_and_a_key_leaving_takes_its_tokens() -> None:
    cache = TokenCache(8)
    cache.put(b"t1" + b"1" * TAIL, _principal("one", ttl=0.05), KEY_A)
    cache.put(b"t2" + b"2" * TAIL, _principal("two"), KEY_A)
    cache.put(b"t3" + b"3" * TAIL, _principal("three"), KEY_B)
    time.sleep(0.06)
    assert cache.get(b"t1" + b"1" * TAIL) is None and len(cache) == 2
    cache.forget([KEY_A])
    assert cache.get(b"t2" + b"2" * TAIL) is None
    assert cache.get(b"t3" + b"3" * TAIL) is not None


def test_a_full_cache_drops_its_oldest_entry() -> None:
    cache = TokenCache(2)
    tokens = [f"token-{n}-".encode() + bytes([65 + n]) * TAIL for n in range(3)]
    for n, token in enumerate(tokens):
        cache.put(token, _principal(str(n)), KEY_A)
    assert len(cache) == 2
    assert cache.get(tokens[0]) is None
    assert cache.get(tokens[1]) is not None and cache.get(tokens[2]) is not None
