"""Scale-out: two uvicorn worker processes on a 3-node Valkey cluster hold every guard exactly."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from policyroute.admin import credits
from policyroute.backends.valkey import ValkeyStore
from policyroute.errors import Problems
from policyroute.identity.totp import code_at, enrol
from tests.servers import uvicorn
from tests.steps.identity_kit import SETTINGS, bearer, subject, token

REPO = Path(__file__).resolve().parent.parent

POLICY = f"""\
version: 1
{SETTINGS}routes:
  GET /limited:
    rate_limit:
      - {{key: user, capacity: 10, refill: 1, per: 1h}}
      - {{key: ip, capacity: 10000, refill: 1, per: 1h}}
  GET /charge:
    credits: {{cost: 1}}
  POST /jobs:
    idempotency: {{required: true}}
  GET /other:
    mfa: {{methods: [totp]}}
  GET /cached/{{item}}:
    breaker: {{failures: 3, reset: 30s, shared: true}}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, cluster_url: str) -> Iterator[tuple[str, str]]:
    """Two uvicorn worker processes of one app on the cluster: (base URL, key prefix)."""
    policy_dir = tmp_path_factory.mktemp("scale-out")
    (policy_dir / "routes.yaml").write_text(POLICY)
    with uvicorn(policy_dir, cluster_url, workers=2, cluster=True) as served:
        yield served.base, served.prefix


@asynccontextmanager
async def cluster_store(url: str, prefix: str) -> AsyncIterator[ValkeyStore]:
    """The fleet's keys, from this process."""
    store = ValkeyStore(url, prefix=prefix, cluster=True)
    try:
        yield store
    finally:
        await store.stop()


async def _spread(
    base: str, method: str, path: str, n: int, headers: dict[str, str], body: bytes = b""
) -> list[httpx.Response]:
    """`n` concurrent requests, each on its own connection, so both processes serve them."""

    async def one() -> httpx.Response:
        async with httpx.AsyncClient(base_url=base, timeout=15) as c:
            return await c.request(method, path, headers=headers, content=body)

    return list(await asyncio.gather(*(one() for _ in range(n))))


def _pids(answers: list[httpx.Response]) -> set[str]:
    return {r.headers["x-pid"] for r in answers}


async def test_a_user_bucket_of_10_admits_exactly_10_across_processes(
    fleet: tuple[str, str],
) -> None:
    base, _ = fleet
    answers = await _spread(base, "GET", "/limited", 40, bearer(token(subject())))
    assert Counter(r.status_code for r in answers) == Counter({200: 10, 429: 30})


async def test_a_balance_of_10_pays_for_exactly_10_across_processes(
    fleet: tuple[str, str], cluster_url: str
) -> None:
    base, prefix = fleet
    who = subject()
    async with cluster_store(cluster_url, prefix) as store:
        await credits.grant(store, who, 10)
        answers = await _spread(base, "GET", "/charge", 40, bearer(token(who)))
        left = await credits.show(store, who)
    assert Counter(r.status_code for r in answers) == Counter({200: 10, 402: 30})
    assert (left.total, left.held) == (0, 0)


async def test_one_idempotency_key_runs_the_handler_once_across_processes(
    fleet: tuple[str, str],
) -> None:
    base, _ = fleet
    headers = {
        **bearer(token(subject())),
        "Idempotency-Key": "job-" + uuid.uuid4().hex,
        "content-type": "application/json",
    }
    answers = await _spread(base, "POST", "/jobs", 20, headers, b'{"n": 1}')
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) <= {201, 409} and statuses[201] >= 1
    done = [r for r in answers if r.status_code == 201]
    assert len({r.content for r in done}) == 1  # every 201 is the one run's bytes
    assert sum(r.headers.get("idempotent-replayed") != "true" for r in done) == 1
    later = await _spread(base, "POST", "/jobs", 4, headers, b'{"n": 1}')
    assert {r.status_code for r in later} == {201}
    assert {r.content for r in later} == {done[0].content}


async def test_a_totp_code_is_accepted_once_across_processes(
    fleet: tuple[str, str], cluster_url: str
) -> None:
    base, prefix = fleet
    who = subject()
    async with cluster_store(cluster_url, prefix) as store:
        secret = (await enrol(store, who)).secret
    code = code_at(secret, time.time())
    answers = await _spread(base, "GET", "/other", 12, {**bearer(token(who)), "x-totp-code": code})
    statuses = Counter(r.status_code for r in answers)
    # One success; every replay is refused (401, or 429 once the failures lock the subject).
    assert statuses[200] == 1 and set(statuses) <= {200, 401, 429}


async def test_a_shared_breaker_opens_for_every_process(fleet: tuple[str, str]) -> None:
    base, _ = fleet
    item = "b" + uuid.uuid4().hex[:6]
    headers = bearer(token(subject()))
    failures = [
        (await _spread(base, "GET", f"/cached/{item}?status=500", 1, headers))[0] for _ in range(3)
    ]
    assert [r.status_code for r in failures] == [500, 500, 500]
    after: list[httpx.Response] = []
    for _ in range(50):  # until both processes have answered (the kernel picks who accepts)
        after += await _spread(base, "GET", f"/cached/{item}", 12, headers)
        if len(_pids(after)) == 2:
            break
        await asyncio.sleep(0.05)  # let the idle process get back to accepting
    assert len(_pids(after)) == 2
    assert {r.status_code for r in after} == {503}
    assert {r.json()["type"] for r in after} == {Problems.CIRCUIT_OPEN.uri}
