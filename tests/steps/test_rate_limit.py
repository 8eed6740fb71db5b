"""rate_limit: token buckets, sliding windows and concurrency caps on a real Valkey."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

import anyio

from policyroute.errors import Problems

from .stateful import client, install, running

BUCKET = """\
version: 1
routes:
  GET /limited:
    public: true
    rate_limit: {key: ip, capacity: 3, refill: 1, per: 60s, name: burst}
  GET /other:
    public: true
    rate_limit:
      - {key: ip, capacity: 5, refill: 5, per: 1s, name: second}
      - {key: route, capacity: 2, refill: 1, per: 1h, name: global}
  GET /charge:
    public: true
    rate_limit: {key: "header:x-tenant", capacity: 1, refill: 1, per: 60s, cost: 1}
"""


async def test_bucket_admits_capacity_then_429_with_retry_after(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, BUCKET, valkey_url, calls)
    async with running(app) as c:
        answers = [await c.get("/limited") for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert calls["limited"] == 3
    assert answers[0].headers["ratelimit-policy"] == '"burst";q=3;w=180'
    assert answers[0].headers["ratelimit"] == '"burst";r=2;t=60'
    assert answers[2].headers["ratelimit"] == '"burst";r=0;t=180'
    denied = answers[3]
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.json()["type"] == Problems.RATE_LIMITED.uri
    # One token comes back every 60 s: never tell the client to come back sooner.
    assert 59 <= int(denied.headers["retry-after"]) <= 60
    assert denied.headers["ratelimit"].startswith('"burst";r=0;t=')


async def test_bucket_refills_on_valkey_time(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, BUCKET, valkey_url, calls)
    async with running(app) as c:
        first = [(await c.get("/other")).status_code for _ in range(2)]
        assert first == [200, 200]
        third = await c.get("/other")
        assert third.status_code == 429  # the route-wide limit of 2
        assert third.json()["limit"] == "global"
        assert int(third.headers["retry-after"]) > 1000


async def test_each_limit_is_all_or_nothing(policy_dir: Path, valkey_url: str) -> None:
    policy = """\
version: 1
routes:
  GET /limited:
    public: true
    rate_limit:
      - {key: ip, capacity: 10, refill: 1, per: 60s, name: wide}
      - {key: ip, capacity: 1, refill: 1, per: 60s, name: narrow}
"""
    calls: Counter[str] = Counter()
    app = install(policy_dir, policy, valkey_url, calls)
    async with running(app) as c:
        statuses = [(await c.get("/limited")).status_code for _ in range(5)]
        last = await c.get("/limited")
    assert statuses == [200, 429, 429, 429, 429]
    # Refusals by `narrow` took nothing from `wide`.
    assert '"wide";r=9' in last.headers["ratelimit"]


async def test_keys_separate_callers(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, BUCKET, valkey_url, calls)
    async with running(app) as a, client(app, "10.1.1.1") as b:
        assert (await a.get("/charge", headers={"x-tenant": "one"})).status_code == 200
        assert (await a.get("/charge", headers={"x-tenant": "one"})).status_code == 429
        assert (await b.get("/charge", headers={"x-tenant": "two"})).status_code == 200
        for _ in range(3):
            assert (await a.get("/limited")).status_code == 200
        assert (await b.get("/limited")).status_code == 200


async def test_concurrent_requests_never_exceed_bucket(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, BUCKET, valkey_url, calls)
    async with running(app) as c:
        answers = await asyncio.gather(*(c.get("/limited") for _ in range(30)))
    assert sorted(r.status_code for r in answers).count(200) == 3
    assert calls["limited"] == 3


SLIDING = """\
version: 1
routes:
  GET /limited:
    public: true
    rate_limit: {key: ip, algorithm: sliding_window, capacity: 2, per: 1s, name: window}
"""


async def test_sliding_window_counts_the_last_period(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, SLIDING, valkey_url, calls)
    async with running(app) as c:
        statuses = [(await c.get("/limited")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        denied = await c.get("/limited")
        assert denied.headers["retry-after"] == "1"
        assert denied.headers["ratelimit-policy"] == '"window";q=2;w=1'
        await anyio.sleep(1.05)
        assert (await c.get("/limited")).status_code == 200


CONCURRENCY = """\
version: 1
routes:
  GET /slow:
    public: true
    rate_limit: {key: ip, algorithm: concurrency, capacity: 2}
  GET /charge:
    public: true
    rate_limit: {key: ip, algorithm: concurrency, capacity: 1}
"""


async def test_concurrency_caps_in_flight_and_releases(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, CONCURRENCY, valkey_url, calls)
    async with running(app) as c:
        answers = await asyncio.gather(*(c.get("/slow?sleep=0.3") for _ in range(5)))
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200, 200, 429, 429, 429]
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.json()["type"] == Problems.CONCURRENCY_LIMITED.uri
        # Released when the handlers ended: the next two go through.
        again = await asyncio.gather(*(c.get("/slow?sleep=0.05") for _ in range(2)))
        assert [r.status_code for r in again] == [200, 200]


async def test_concurrency_slot_released_when_handler_fails(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, CONCURRENCY, valkey_url, calls)
    async with running(app) as c:
        for _ in range(3):
            with contextlib.suppress(RuntimeError):  # ASGITransport re-raises it
                await c.get("/charge?status=599")
        assert (await c.get("/charge")).status_code == 200
    assert calls["charge"] == 4


async def test_concurrency_slot_released_when_client_disconnects(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, CONCURRENCY, valkey_url, calls)
    async with running(app) as c:
        with anyio.move_on_after(0.1):
            await c.get("/charge?sleep=5")
        await anyio.sleep(0.05)
        assert (await c.get("/charge")).status_code == 200
