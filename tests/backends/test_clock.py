"""Valkey's time read off the worker's clock: sampled, filtered, and given up when stale."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import pytest

from policyroute.backends import clock as clock_module
from policyroute.backends.clock import ASK_SERVER, MAX_ERROR_MS, STALE, ServerClock
from policyroute.backends.embedded import start_valkey
from policyroute.backends.valkey import ValkeyStore

from .kit import server_ms


async def _heard(clock: ServerClock) -> None:
    """Wait for the sample in flight and for its callback."""
    assert clock._sampling is not None
    with contextlib.suppress(Exception):
        await clock._sampling
    await asyncio.sleep(0)


async def _sampled(store: ValkeyStore) -> int | str:
    store.now()  # a call when a sample is due asks for one
    assert store.clock is not None
    await _heard(store.clock)
    return store.now()


async def test_scripts_ask_the_server_until_a_sample_then_read_valkey_s_time(
    valkey_url: str,
) -> None:
    store = ValkeyStore(valkey_url, prefix="t" + uuid.uuid4().hex[:10])
    try:
        assert store.now() == ASK_SERVER
        now = await _sampled(store)
        server = await server_ms(store)
        assert isinstance(now, int) and abs(server - now) <= 5
    finally:
        await store.stop()


async def test_a_process_whose_clocks_are_an_hour_off_still_reads_valkey_s_time(
    valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither the wall clock nor the monotonic clock's origin is trusted: only its rate.
    real_time, real_monotonic = time.time, time.monotonic
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    store = ValkeyStore(valkey_url, prefix="t" + uuid.uuid4().hex[:10])
    assert store.clock is not None
    store.clock._tick = lambda: real_monotonic() - 3600
    try:
        now = await _sampled(store)
        server = await server_ms(store)
        assert isinstance(now, int) and abs(server - now) <= 5
    finally:
        await store.stop()


class _Tick:
    def __init__(self) -> None:
        self.at = 1000.0

    def __call__(self) -> float:
        return self.at


def _clock() -> tuple[ServerClock, _Tick]:
    def never() -> asyncio.Future[Any]:
        raise AssertionError("no sample is asked for in these tests")

    tick = _Tick()
    clock = ServerClock(never)
    clock._tick = tick
    clock._due = float("inf")  # samples are added by hand
    return clock, tick


def test_the_sample_with_the_least_error_sets_the_time() -> None:
    clock, tick = _clock()
    clock.add(100.0, 5.0, tick.at)
    clock.add(103.0, 1.0, tick.at)  # within both errors of the first: the better one wins
    assert clock.now() == 1_000_103 and clock.error == 1.0
    clock.add(101.0, 4.0, tick.at)  # a worse sample (a busy write delayed it) moves nothing
    assert clock.now() == 1_000_103


def test_a_stepped_clock_replaces_the_estimate_at_once() -> None:
    clock, tick = _clock()
    clock.add(100.0, 1.0, tick.at)
    clock.add(90.0, 4.0, tick.at)  # 10 ms off, more than both errors: a clock was stepped
    assert clock.now() == 1_000_090 and clock.error == 4.0


def test_an_estimate_too_uncertain_or_too_old_is_not_used() -> None:
    clock, tick = _clock()
    clock.add(100.0, MAX_ERROR_MS + 1, tick.at)
    assert clock.now() == ASK_SERVER
    clock.add(100.0, 1.0, tick.at)
    assert clock.now() == 1_000_100
    tick.at += STALE + 1  # no sample succeeded since: the scripts ask the server again
    assert clock.now() == ASK_SERVER


async def test_a_stopped_server_leaves_the_estimate_to_age_then_scripts_ask_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_valkey()
    store = ValkeyStore(server.url, prefix="t" + uuid.uuid4().hex[:10], timeout=0.2)
    assert store.clock is not None
    tick = _Tick()
    tick.at = time.monotonic()
    store.clock._tick = tick
    try:
        assert isinstance(await _sampled(store), int)
        server.stop()
        tick.at += clock_module.EVERY  # due: this call starts a sample, which fails
        assert isinstance(store.now(), int)
        await _heard(store.clock)
        assert isinstance(store.now(), int)  # an estimate a few seconds old still serves
        tick.at += STALE
        assert store.now() == ASK_SERVER  # and, due, another sample: it fails too
        await _heard(store.clock)
        server.restart()
        tick.at += clock_module.EVERY
        now = await _sampled(store)  # the next sample, once the server is back
        assert isinstance(now, int) and abs(await server_ms(store) - now) <= 50
    finally:
        await store.stop()
        server.stop()


async def test_a_sample_starts_no_task(valkey_url: str) -> None:
    # Sampling rides on a request's call (a callback on the TIME reply): a request that
    # finds a sample due makes no task of its own for it.
    store = ValkeyStore(valkey_url, prefix="t" + uuid.uuid4().hex[:10])
    assert store.clock is not None
    loop = asyncio.get_running_loop()
    made: list[object] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    try:
        assert isinstance(await _sampled(store), int)  # connected, one sample in
        store.clock._due = float("-inf")
        loop.set_task_factory(factory)
        try:
            assert isinstance(await _sampled(store), int)
        finally:
            loop.set_task_factory(None)
        assert made == []
    finally:
        await store.stop()
