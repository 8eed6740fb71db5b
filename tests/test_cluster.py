"""Scale-out: limits and credits hold across worker processes and on a 3-node Valkey cluster."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

import policyroute
from policyroute.admin import credits
from policyroute.backends.valkey import ValkeyStore
from tests.servers import uvicorn
from tests.steps.identity_kit import SETTINGS, bearer, subject, token
from tests.steps.stateful import engine, make_app, running

REPO = Path(__file__).resolve().parent.parent

POLICY = """\
version: 1
routes:
  GET /limited:
    public: true
    rate_limit: {key: ip, capacity: 10, refill: 1, per: 1h}
  GET /charge:
    public: true
    credits: {cost: 1}
  GET /other:
    public: true
"""


@pytest.fixture
def workers(policy_dir: Path, valkey_url: str) -> Iterator[tuple[str, str]]:
    """Four uvicorn worker processes of one app on a free port: (base URL, key prefix)."""
    (policy_dir / "routes.yaml").write_text(POLICY)
    with uvicorn(policy_dir, valkey_url, workers=4) as served:
        yield served.base, served.prefix


async def _burst(base: str, path: str, n: int) -> Counter[int]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as c:
        answers = await asyncio.gather(*(c.get(path) for _ in range(n)))
    return Counter(r.status_code for r in answers)


async def test_bucket_of_10_across_4_processes_admits_exactly_10(
    workers: tuple[str, str],
) -> None:
    base, _ = workers
    assert await _burst(base, "/limited", 100) == Counter({200: 10, 429: 90})


async def test_balance_of_10_across_4_processes_pays_for_exactly_10(
    workers: tuple[str, str], valkey_url: str
) -> None:
    base, prefix = workers
    store = ValkeyStore(valkey_url, prefix=prefix)
    try:
        await credits.grant(store, "127.0.0.1", 10, ip=True)
        assert await _burst(base, "/charge", 100) == Counter({200: 10, 402: 90})
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 0
    finally:
        await store.stop()


@asynccontextmanager
async def cluster_app(
    policy_dir: Path, url: str
) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """The test app on the cluster; yields a client and the app."""
    (policy_dir / "routes.yaml").write_text(POLICY)
    app = make_app(Counter())
    settings = policyroute.Settings(
        valkey_url=url, valkey_cluster=True, key_prefix="c" + uuid.uuid4().hex[:10]
    )
    policyroute.install(app, policy_dir, settings=settings)
    async with running(app) as c:
        yield c, app


async def test_cluster_bucket_admits_exactly_capacity(policy_dir: Path, cluster_url: str) -> None:
    async with cluster_app(policy_dir, cluster_url) as (c, _):
        answers = await asyncio.gather(*(c.get("/limited") for _ in range(30)))
    assert Counter(r.status_code for r in answers) == Counter({200: 10, 429: 20})


async def test_cluster_credits_never_overdraw(policy_dir: Path, cluster_url: str) -> None:
    async with cluster_app(policy_dir, cluster_url) as (c, app):
        store = engine(app).services["valkey"]  # type: ignore[arg-type]
        await credits.grant(store, "127.0.0.1", 10, ip=True)
        answers = await asyncio.gather(*(c.get("/charge") for _ in range(30)))
        left = await credits.show(store, "127.0.0.1", ip=True)
    assert Counter(r.status_code for r in answers) == Counter({200: 10, 402: 20})
    assert left.total == 0


MIXED = f"""\
version: 1
{SETTINGS}routes:
  GET /limited:
    rate_limit:
      - {{key: ip, capacity: 3, refill: 1, per: 1h}}
      - {{key: user, capacity: 2, refill: 1, per: 1h}}
    credits: {{cost: 1}}
  GET /cached/{{item}}:
    rate_limit: {{key: ip, capacity: 100, refill: 1, per: 1h}}
    credits: {{cost: 1}}
    idempotency: {{}}
    cache: {{ttl: 60s, shared: true, acknowledge_shared: true}}
"""


@asynccontextmanager
async def mixed_app(policy_dir: Path, url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """An authenticated app whose routes mix address-, route- and subject-tagged keys."""
    (policy_dir / "routes.yaml").write_text(MIXED)
    app = make_app(Counter())
    settings = policyroute.Settings(
        valkey_url=url, valkey_cluster=True, key_prefix="m" + uuid.uuid4().hex[:10]
    )
    policyroute.install(app, policy_dir, settings=settings)
    async with running(app) as c:
        yield c, engine(app).services["valkey"]


async def test_cluster_runs_keys_of_several_tags_with_one_script_semantics(
    policy_dir: Path, cluster_url: str
) -> None:
    """Limits by address and by user plus credits by user: no CROSSSLOT, all-or-nothing."""
    alice, bob = subject(), subject()
    async with mixed_app(policy_dir, cluster_url) as (c, store):
        for who in (alice, bob):
            await credits.grant(store, who, 10)
        a, b = bearer(token(alice)), bearer(token(bob))
        # alice's own bucket (2) runs out first; her refusal must not spend the shared
        # address bucket (3), so bob still gets his two.
        codes = [(await c.get("/limited", headers=a)).status_code for _ in range(4)]
        assert codes == [200, 200, 429, 429]
        codes = [(await c.get("/limited", headers=b)).status_code for _ in range(2)]
        assert codes == [200, 429]  # the address bucket held 3: alice 2 + bob 1
        assert (await credits.show(store, alice)).total == 8
        assert (await credits.show(store, bob)).total == 9


async def test_cluster_shared_cache_hit_is_free_and_a_short_balance_frees_the_lock(
    policy_dir: Path, cluster_url: str
) -> None:
    alice, broke = subject(), subject()
    async with mixed_app(policy_dir, cluster_url) as (c, store):
        await credits.grant(store, alice, 5)
        poor = await c.get("/cached/x", headers=bearer(token(broke)))
        assert poor.status_code == 402
        # The refused miss released the stampede lock: alice's miss runs at once.
        started = time.monotonic()
        first = await c.get("/cached/x", headers=bearer(token(alice)))
        assert first.status_code == 200 and time.monotonic() - started < 1
        hit = await c.get("/cached/x", headers=bearer(token(alice)))
        assert hit.headers["x-cache"] == "hit" and hit.content == first.content
        assert (await credits.show(store, alice)).total == 4  # the hit cost nothing
