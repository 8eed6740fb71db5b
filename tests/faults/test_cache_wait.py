"""A cache miss waiting for another request's miss (the stampede lock) when Valkey fails.

The first request for an entry takes the lock and runs the handler; a second one for
the same entry polls Valkey until the first stores it. If Valkey stops answering while
it polls, a fail-open cache (the default) runs the handler itself: 200, never a 500.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

import policyroute
from tests.steps.identity_kit import SETTINGS, bearer, subject, token

from .app import make_app
from .kit import HOLD
from .proxy import FaultProxy

POLICY = f"""\
version: 1
{SETTINGS}routes:
  GET /mine/{{item}}:
    cache: {{ttl: 10s, lock: 5s}}
"""


@pytest.fixture
def proxy(valkey_url: str) -> Iterator[FaultProxy]:
    """A link to the session's Valkey (only the link is faulted)."""
    port = int(valkey_url.rsplit(":", 1)[1].split("/", 1)[0])
    with FaultProxy("127.0.0.1", port) as link:
        yield link


@asynccontextmanager
async def _serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process; an exception escaping it is a 500, as a server answers."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=10) as c:
            yield c


@pytest.mark.parametrize("fault", ["pause", "blackhole"])
async def test_a_waiting_miss_runs_the_handler_when_valkey_fails_during_its_wait(
    fault: str, proxy: FaultProxy, policy_dir: Path
) -> None:
    (policy_dir / "routes.yaml").write_text(POLICY)
    app = make_app()
    policyroute.install(
        app, policy_dir, settings=policyroute.Settings(valkey_url=proxy.url("redis", "/0"))
    )
    who = subject()
    headers = bearer(token(who))
    async with _serving(app) as c:
        assert (await c.get("/mine/warm", headers=headers)).status_code == 200
        leader = asyncio.create_task(c.get("/mine/x?sleep=1", headers=headers))
        await asyncio.sleep(0.2)  # the leader holds the lock, in its handler
        waiter = asyncio.create_task(c.get("/mine/x?sleep=1", headers=headers))
        await asyncio.sleep(0.2)  # the waiter polls
        proxy.pause() if fault == "pause" else proxy.blackhole()
        await asyncio.sleep(HOLD)
        proxy.heal()
        first, second = await asyncio.gather(leader, waiter)
    problems = [
        f"the {name} answered {r.status_code} {r.text[:120]!r}"
        for name, r in (("leader", first), ("waiter", second))
        if r.status_code != 200 or r.json().get("subject") != who
    ]
    if problems:
        pytest.fail(f"{fault} during a cache wait: " + "; ".join(problems), pytrace=False)
