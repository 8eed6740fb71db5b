"""Routes that use no lockout, one-time tokens, throttle or debounce pay nothing for them.

Counted, not timed: the steps of their chains are the ones they had (the plain auth step,
no replay step, a rate-limit part that reads no body and never waits), and a request
makes the same Valkey calls (every command is counted by the server, `INFO commandstats`).
The same routes under `settings.auth.lockout` show that the count sees one
call more per request.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import valkey.asyncio as avalkey

from policyroute.admin import credits
from policyroute.steps.auth import AuthStep, LockoutAuthStep
from policyroute.steps.rate_limit import RateLimitStep

from .steps.identity_kit import SETTINGS, bearer, subject, token
from .steps.stateful import engine, install, running

ROUTES = """\
routes:
  GET /limited:
    rate_limit: {key: user, capacity: 1000, refill: 1000, per: 1m}
    credits: {cost: 1, on_backend_error: open}
  GET /other: {}
  GET /slow:
    rate_limit:
      - {key: user, algorithm: sliding_window, capacity: 1000, per: 1m}
      - {key: user, algorithm: concurrency, capacity: 10}
"""


# No request sends these: the clock's samples, and the introduction of a new connection
# (this count's own among them).
UNCOUNTED = frozenset({"TIME", "CLIENT"})


@pytest.fixture
async def calls(valkey_url: str) -> AsyncIterator[Calls]:
    """The commands clients send Valkey, as the server sees them (`MONITOR`)."""
    counted = Calls(avalkey.from_url(valkey_url))  # type: ignore[no-untyped-call]
    try:
        yield counted
    finally:
        await counted.stop()
        await counted.client.aclose()


class Calls:
    """Commands clients sent between `clear` and `seen`, by name.

    Read from `MONITOR`, which shows every command the server runs: a script's own
    commands are marked `lua` and left out, as are this count's own marker and `UNCOUNTED`.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.monitor: Any = None
        self.marker = f"count-{uuid.uuid4().hex}"
        self.last: Counter[str] = Counter()  # what the last `seen` found

    async def clear(self) -> None:
        """Count from here."""
        await self.stop()
        await self.client.ping()  # connected (and introduced) before the count starts
        self.monitor = self.client.monitor()
        await self.monitor.__aenter__()

    async def seen(self) -> Counter[str]:
        """What clients sent since `clear`."""
        assert self.monitor is not None
        await self.client.echo(self.marker)  # the last command counted: read up to it
        seen: Counter[str] = Counter()
        while True:
            info = await asyncio.wait_for(self.monitor.next_command(), 10)
            words = info["command"].split(" ", 2)
            if info["client_type"] == "lua":
                continue
            if words[0].upper() == "ECHO" and self.marker in info["command"]:
                self.last = seen
                return seen
            if words[0].upper() not in UNCOUNTED:
                seen[words[0].upper()] += 1

    async def stop(self) -> None:
        """End the count (and close its connections)."""
        if self.monitor is not None:
            await self.monitor.__aexit__(None, None, None)
            self.monitor = None


def steps(app: Any, route: str) -> list[str]:
    """The names of a route's compiled steps, parts of the state step included."""
    chain = next(c for c in engine(app).chains() if c.route == route)
    names = []
    for step in chain.steps:
        names.append(f"{step.name}:{type(step).__name__}")
        names.extend(f"  {p.name}:{type(p).__name__}" for p in getattr(step, "parts", ()))
    return names


async def per_request(app: Any, path: str, calls: Calls, n: int = 5) -> float:
    """Valkey commands per request, a verified (cached) token, after a first request."""
    who = subject()
    headers = bearer(token(who))
    store = engine(app).services["valkey"]
    async with running(app) as c:
        await credits.grant(store, who, 100)
        assert (await c.get(path, headers=headers)).status_code == 200
        await store.settle()
        await calls.clear()
        for _ in range(n):
            assert (await c.get(path, headers=headers)).status_code == 200
        await store.settle()
        seen = await calls.seen()
    return sum(seen.values()) / n


async def test_routes_without_the_new_keys_keep_their_steps_and_their_calls(
    policy_dir: Path, valkey_url: str, calls: Calls
) -> None:
    app = install(policy_dir, f"version: 1\n{SETTINGS}{ROUTES}", valkey_url, Counter())
    assert steps(app, "GET /limited") == [
        "client:ClientStep",
        "auth:AuthStep",
        "state:StateStep",
        "  rate_limit:RateLimitStep",
        "  credits:CreditsStep",
    ]
    assert steps(app, "GET /other") == ["auth:AuthStep"]
    chain = next(c for c in engine(app).chains() if c.route == "GET /slow")
    part = chain.steps[-1].parts[0]  # type: ignore[attr-defined]
    assert isinstance(part, RateLimitStep)
    assert (part.needs_io, part.special, part.joins) == (False, False, None)
    assert type(chain.steps[1]) is AuthStep
    # One script call before the handler, one after (credits settle); none on auth alone.
    assert await per_request(app, "/limited", calls) == 2
    assert calls.last == Counter({"EVALSHA": 10})
    assert await per_request(app, "/other", calls) == 0
    assert await per_request(app, "/slow", calls) == 2  # the slot is released after


async def test_under_a_lockout_the_same_routes_make_one_call_more(
    policy_dir: Path, valkey_url: str, calls: Calls
) -> None:
    settings = SETTINGS + "    lockout: {failures: 10, per: 5m, block: 15m}\n"
    app = install(policy_dir, f"version: 1\n{settings}{ROUTES}", valkey_url, Counter())
    assert steps(app, "GET /other") == ["client:ClientStep", "auth:LockoutAuthStep"]
    assert isinstance(next(c for c in engine(app).chains() if c.route == "GET /other").steps[1],
                      LockoutAuthStep)  # fmt: skip
    assert await per_request(app, "/limited", calls) == 3
    assert await per_request(app, "/other", calls) == 1


async def test_a_request_through_the_common_steps_starts_no_task_of_its_own(
    policy_dir: Path, valkey_url: str
) -> None:
    # Guards, a bucket, credits and a cache miss that stores, one request at a time: as
    # many tasks as a route with auth alone (a reservation once started a task that ran
    # once and ended, on every request that did not overlap another).
    routes = ROUTES + "  GET /cached/{item}:\n" \
        "    rate_limit: {key: user, capacity: 1000, refill: 1000, per: 1m}\n" \
        "    credits: {cost: 1}\n    cache: {ttl: 1m}\n"
    app = install(policy_dir, f"version: 1\n{SETTINGS}{routes}", valkey_url, Counter())
    who = subject()
    headers = bearer(token(who))
    loop = asyncio.get_running_loop()
    made: Counter[str] = Counter()
    path = [""]

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made[path[0]] += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with running(app) as c:
        await credits.grant(engine(app).services["valkey"], who, 100)
        for first in ("/other", "/limited", "/cached/0"):
            assert (await c.get(first, headers=headers)).status_code == 200
        loop.set_task_factory(factory)
        try:
            for name in ("/other", "/limited", "/cached"):
                path[0] = name
                for n in range(1, 11):
                    item = f"/{n}" if name == "/cached" else ""  # each a miss that stores
                    assert (await c.get(name + item, headers=headers)).status_code == 200
        finally:
            loop.set_task_factory(None)
        balance = await credits.show(engine(app).services["valkey"], who)
    assert made["/limited"] == made["/cached"] == made["/other"]
    assert (balance.total, balance.held) == (78, 0)  # 2 + 20 charges, each settled
