"""Breaker semantics (pybreaker's), the same for the local and the Valkey-shared breaker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from policyroute.backends.valkey import ValkeyStore
from policyroute.language.policy import Breaker
from policyroute.resilience import CircuitOpen, LocalBreaker, SharedBreaker
from policyroute.resilience.breaker import CircuitBreaker

Pair = tuple[CircuitBreaker, CircuitBreaker]


class BusinessError(Exception):
    """An error the breaker is told to ignore."""


@asynccontextmanager
async def pair(kind: str, spec: Breaker, valkey_url: str) -> AsyncIterator[Pair]:
    """Two workers' view of one breaker (the same object when it is local)."""
    if kind == "local":
        one = LocalBreaker("t", spec, (BusinessError,))
        yield one, one
        return
    prefix = "b" + uuid.uuid4().hex[:10]
    stores = [ValkeyStore(valkey_url, prefix=prefix) for _ in range(2)]
    try:
        a, b = (
            SharedBreaker("t", "GET /t", spec, s, LocalBreaker("t", spec, (BusinessError,)), 5.0)
            for s in stores
        )
        yield a, b
    finally:
        for s in stores:
            await s.stop()


@pytest.fixture(params=["local", "shared"])
def kind(request: pytest.FixtureRequest) -> str:
    """Every test runs against both breakers (two workers for the shared one)."""
    value: str = request.param
    return value


async def call(breaker: CircuitBreaker, error: BaseException | None = None) -> None:
    """One admitted call that ends with `error` (None: success)."""
    ticket = await breaker.admit()
    await breaker.record(ticket, error)


async def test_consecutive_failures_trip_and_a_success_resets_the_count(
    kind: str, valkey_url: str
) -> None:
    async with pair(kind, Breaker(failures=3, reset=30), valkey_url) as (a, b):
        await call(a, OSError())
        await call(b, OSError())
        await call(a)  # a success in between: the count starts again
        await call(b, OSError())
        await call(a, OSError())
        await call(b)  # still closed: two in a row
        for worker in (a, b, a):
            await call(worker, OSError())
        for worker in (a, b):
            with pytest.raises(CircuitOpen) as refused:
                await worker.admit()
            assert 29 < refused.value.retry_after <= 30


async def test_excluded_exceptions_never_count(kind: str, valkey_url: str) -> None:
    async with pair(kind, Breaker(failures=2, reset=30), valkey_url) as (a, b):
        for _ in range(4):
            await call(a, BusinessError())
            await call(b, BusinessError())
        await call(a, OSError())
        await call(b)  # closed all along


async def test_half_open_needs_success_threshold_and_a_failure_reopens(
    kind: str, valkey_url: str
) -> None:
    spec = Breaker(failures=1, reset=0.2, success_threshold=2)
    async with pair(kind, spec, valkey_url) as (a, b):
        await call(a, OSError())
        with pytest.raises(CircuitOpen):
            await b.admit()
        await asyncio.sleep(0.25)
        await call(b)  # one trial success: still half-open (needs two)
        await call(a, OSError())  # a failing trial re-opens at once
        with pytest.raises(CircuitOpen):
            await b.admit()
        await asyncio.sleep(0.25)
        await call(a)
        await call(b)  # two successes: closed
        for worker in (a, b, a):
            await call(worker)


async def test_half_open_trial_slots_are_bounded_and_freed(kind: str, valkey_url: str) -> None:
    spec = Breaker(failures=1, reset=0.2, half_open_calls=2, success_threshold=3)
    async with pair(kind, spec, valkey_url) as (a, b):
        await call(a, OSError())
        await asyncio.sleep(0.25)
        first, second = await a.admit(), await b.admit()
        with pytest.raises(CircuitOpen) as busy:
            await a.admit()
        assert busy.value.headers["Retry-After"] == "1"
        await b.release(second)  # abandoned (client went away): the slot is free again
        third = await b.admit()
        await a.record(first, None)
        await b.record(third, None)
        await call(a)  # three trial successes: closed
        await call(b)


async def test_outcome_from_an_earlier_state_is_ignored(kind: str, valkey_url: str) -> None:
    async with pair(kind, Breaker(failures=1, reset=0.2), valkey_url) as (a, b):
        late = await a.admit()  # admitted while closed ...
        await call(b, OSError())  # ... then another call opens the breaker
        await asyncio.sleep(0.25)
        trial = await b.admit()  # half-open
        await a.record(late, None)  # the late success must not close it
        with pytest.raises(CircuitOpen):
            await a.admit()  # the one trial slot is still taken
        await b.record(trial, None)
        await call(a)
