"""Routes that use no lockout, one-time tokens, throttle or debounce pay nothing for them.

Counted, not timed: the steps of their chains are the ones they had (the plain auth step,
no replay step, a rate-limit part that reads no body and never waits), and a request
makes the same Valkey calls (every command this process sends is counted at the
pipeline). The same routes under `settings.auth.lockout` show that the count sees one
call more per request.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policyroute.admin import credits
from policyroute.backends.pipeline import Pipeline
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


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Every command sent to Valkey through the pipeline, by command name."""
    seen: Counter[str] = Counter()
    execute, join = Pipeline.execute, Pipeline.join

    def counted_execute(self: Pipeline, *args: Any) -> Any:
        seen[str(args[0])] += 1
        return execute(self, *args)

    def counted_join(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        seen["EVALSHA"] += 1
        return join(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "execute", counted_execute)
    monkeypatch.setattr(Pipeline, "join", counted_join)
    yield seen


def steps(app: Any, route: str) -> list[str]:
    """The names of a route's compiled steps, parts of the state step included."""
    chain = next(c for c in engine(app).chains() if c.route == route)
    names = []
    for step in chain.steps:
        names.append(f"{step.name}:{type(step).__name__}")
        names.extend(f"  {p.name}:{type(p).__name__}" for p in getattr(step, "parts", ()))
    return names


async def per_request(app: Any, path: str, seen: Counter[str], n: int = 5) -> float:
    """Valkey commands per request, a verified (cached) token, after a first request."""
    who = subject()
    headers = bearer(token(who))
    store = engine(app).services["valkey"]
    async with running(app) as c:
        await credits.grant(store, who, 100)
        assert (await c.get(path, headers=headers)).status_code == 200
        await store.settle()
        seen.clear()
        for _ in range(n):
            assert (await c.get(path, headers=headers)).status_code == 200
        await store.settle()
    return sum(seen.values()) / n


async def test_routes_without_the_new_keys_keep_their_steps_and_their_calls(
    policy_dir: Path, valkey_url: str, calls: Counter[str]
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
    assert calls == Counter({"EVALSHA": 10})
    assert await per_request(app, "/other", calls) == 0
    assert await per_request(app, "/slow", calls) == 2  # the slot is released after


async def test_under_a_lockout_the_same_routes_make_one_call_more(
    policy_dir: Path, valkey_url: str, calls: Counter[str]
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
