"""retry, breaker, timeout and resilience profiles around real handlers, on a real Valkey."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from policyroute.admin import credits
from policyroute.backends.valkey import ValkeyStore
from policyroute.errors import Problems
from tests.resilience.apps import engine, install
from tests.servers import uvicorn

PROBLEM = "application/problem+json"
REPO = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def running(*apps: FastAPI) -> AsyncIterator[list[httpx.AsyncClient]]:
    """Start every app (each is one "worker") and yield a client of each."""
    async with AsyncExitStack() as stack:
        clients = []
        for app in apps:
            await stack.enter_async_context(LifespanManager(app))
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
            clients.append(
                await stack.enter_async_context(
                    httpx.AsyncClient(transport=transport, base_url="http://t")
                )
            )
        yield clients


def policy(route: str, body: str, extra: str = "") -> str:
    """A policy file with one public route."""
    lines = "\n".join("    " + line for line in body.strip().splitlines())
    return f"version: 1\n{extra}routes:\n  {route}:\n    public: true\n{lines}\n"


BREAKER = policy("GET /work", "breaker: {failures: 3, reset: 5s}")


async def test_breaker_opens_after_failures_with_503_and_retry_after(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, BREAKER, valkey_url, calls)
    async with running(app) as (c,):
        failures = [(await c.get("/work?fail=99")).status_code for _ in range(3)]
        refused = await c.get("/work")
        await asyncio.sleep(1.2)
        later = await c.get("/work")
    assert failures == [500, 500, 500]
    assert calls["work"] == 3  # the open breaker never calls the handler
    assert refused.status_code == 503
    assert refused.headers["content-type"] == PROBLEM
    assert refused.json()["type"] == Problems.CIRCUIT_OPEN.uri
    assert refused.headers["retry-after"] == "5"
    assert later.headers["retry-after"] == "4"  # what is left of the 5s reset, rounded up


def transitions(breaker: str, old: str, new: str) -> float:
    """The transition counter of this process."""
    from prometheus_client import REGISTRY

    labels = {"breaker": breaker, "from_state": old, "to_state": new}
    return REGISTRY.get_sample_value("policyroute_breaker_transitions_total", labels) or 0.0


SHARED = policy("GET /work", "breaker: {failures: 3, reset: 30s, shared: true}")


async def test_shared_breaker_stops_every_worker_within_one_request(
    policy_dir: Path, valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: Counter[str] = Counter()
    prefix = "r" + uuid.uuid4().hex[:10]
    # Two engines with their own Valkey clients: two workers of one deployment.
    a = install(policy_dir, SHARED, valkey_url, calls, prefix)
    b = install(policy_dir, SHARED, valkey_url, calls, prefix)
    before = transitions("GET /work", "closed", "open")
    async with running(a, b) as (ca, cb):
        assert (await ca.get("/work?fail=99")).status_code == 500
        assert (await cb.get("/work?fail=99")).status_code == 500
        assert (await ca.get("/work?fail=99")).status_code == 500  # third failure: open
        on_b = await cb.get("/work")  # b saw two of the three failures, yet refuses
        on_a = await ca.get("/work")
    assert calls["work"] == 3
    assert on_b.status_code == on_a.status_code == 503
    assert on_b.json()["type"] == Problems.CIRCUIT_OPEN.uri
    assert on_b.headers["retry-after"] in ("29", "30")
    assert transitions("GET /work", "closed", "open") == before + 1  # one change, counted once
    assert "circuit breaker GET /work: closed -> open" in caplog.text


HALF_OPEN = policy(
    "GET /work", "breaker: {failures: 1, reset: 500ms, half_open_calls: 2, shared: true}"
)


async def test_half_open_admits_the_configured_trials_across_workers(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    prefix = "r" + uuid.uuid4().hex[:10]
    a = install(policy_dir, HALF_OPEN, valkey_url, calls, prefix)
    b = install(policy_dir, HALF_OPEN, valkey_url, calls, prefix)
    async with running(a, b) as (ca, cb):
        assert (await ca.get("/work?fail=1")).status_code == 500  # open
        assert (await cb.get("/work")).status_code == 503
        await asyncio.sleep(0.6)  # reset elapsed: half-open
        burst = await asyncio.gather(*(c.get("/work?sleep=0.3") for c in (ca, cb, ca, cb, ca, cb)))
        closed = await cb.get("/work")  # the trials succeeded: closed again
    statuses = Counter(r.status_code for r in burst)
    assert statuses == Counter({200: 2, 503: 4})
    assert calls["work"] == 2 + 1 + 1
    assert all(r.headers["retry-after"] == "1" for r in burst if r.status_code == 503)
    assert closed.status_code == 200


RETRY = policy(
    "GET /work",
    """
retry: {attempts: 3, backoff: fixed, initial: 10ms, jitter: false, on: [5xx, ConnectionError]}
breaker: {failures: 2, reset: 30s}
""",
)


async def test_retry_recovers_and_the_breaker_counts_one_call(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, RETRY, valkey_url, calls)
    async with running(app) as (c,):
        recovered = await c.get("/work?key=a&fail=2")
        raised = await c.get("/work?key=b&fail=1&raise_=connection")
        exhausted = await c.get("/work?key=c&fail=99&status=502")
        still_closed = await c.get("/work?key=d")  # one failed request is one breaker failure
    assert recovered.status_code == 200 and recovered.json()["call"] == 3
    assert raised.status_code == 200 and calls["b"] == 2
    assert exhausted.status_code == 502 and calls["c"] == 3  # the last attempt's answer
    assert still_closed.status_code == 200


async def test_4xx_is_never_retried_and_is_no_breaker_failure(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, RETRY, valkey_url, calls)
    async with running(app) as (c,):
        answers = [(await c.get("/work?fail=99&status=404")).status_code for _ in range(3)]
    assert answers == [404, 404, 404]
    assert calls["work"] == 3  # one call each: no retry, and the breaker never opened


async def test_exception_not_listed_is_not_retried(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, RETRY, valkey_url, calls)
    async with running(app) as (c,):
        with pytest.raises(ValueError, match="bad input"):
            await c.get("/work?fail=1&raise_=value")
    assert calls["work"] == 1


DEADLINE = policy(
    "GET /work",
    "retry: {attempts: 20, backoff: fixed, initial: 100ms, jitter: false, deadline: 450ms}",
)


async def test_retries_stop_at_the_deadline(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, DEADLINE, valkey_url, calls)
    async with running(app) as (c,):
        started = time.monotonic()
        answer = await c.get("/work?fail=99")
        elapsed = time.monotonic() - started
        started = time.monotonic()
        slow = await c.get("/work?key=slow&sleep=2")
        slow_elapsed = time.monotonic() - started
    assert answer.status_code == 500
    assert 3 <= calls["k"] <= 5  # attempts at ~0, 100, 200, 300, 400ms; none after 450ms
    assert elapsed < 0.6
    assert slow.status_code == 504  # the deadline also bounds an attempt still running
    assert slow.json()["type"] == Problems.UPSTREAM_TIMEOUT.uri
    assert slow_elapsed < 0.7


UNSAFE = policy(
    "POST /work",
    """
retry: {attempts: 3, backoff: fixed, initial: 10ms, jitter: false}
idempotency: {header: Idempotency-Key}
""",
)


async def test_unsafe_method_is_retried_only_with_an_idempotency_key(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, UNSAFE, valkey_url, calls)
    async with running(app) as (c,):
        bare = await c.post("/work?key=bare&fail=1", content=b'{"n": 1}')
        keyed = await c.post(
            "/work?key=keyed&fail=2", content=b'{"n": 2}', headers={"Idempotency-Key": "k-1"}
        )
    assert bare.status_code == 500 and calls["bare"] == 1
    assert keyed.status_code == 200 and calls["keyed"] == 3
    assert keyed.json()["body"] == '{"n": 2}'  # every attempt read the whole body


CREDITS = policy(
    "GET /work",
    """
credits: {cost: 2}
retry: {attempts: 3, backoff: fixed, initial: 10ms, jitter: false, on: [5xx, ConnectionError]}
""",
)


async def test_retried_request_is_charged_exactly_once(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, CREDITS, valkey_url, calls)
    async with running(app) as (c,):
        store: ValkeyStore = engine(app).services["valkey"]
        await credits.grant(store, "127.0.0.1", 10, ip=True)
        recovered = await c.get("/work?key=a&fail=2")
        after_recovered = (await credits.show(store, "127.0.0.1", ip=True)).total
        failed = await c.get("/work?key=b&fail=99")
        after_failed = (await credits.show(store, "127.0.0.1", ip=True)).total
        with pytest.raises(ConnectionError):
            await c.get("/work?key=c&fail=99&raise_=connection")
        after_raised = (await credits.show(store, "127.0.0.1", ip=True)).total
    assert recovered.status_code == 200 and calls["a"] == 3
    assert after_recovered == 8  # three attempts, one charge
    assert failed.status_code == 500 and calls["b"] == 3
    assert after_failed == 8  # the final 5xx is refunded once
    assert calls["c"] == 3 and after_raised == 8  # the final exception is refunded once


TIMEOUT = policy(
    "GET /work",
    """
timeout: 200ms
retry: {attempts: 2, backoff: fixed, initial: 10ms, jitter: false, on: [timeout]}
""",
)


async def test_timeout_per_attempt_then_504(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, TIMEOUT, valkey_url, calls)
    async with running(app) as (c,):
        started = time.monotonic()
        late = await c.get("/work?sleep=1")
        elapsed = time.monotonic() - started
        quick = await c.get("/work?key=q")
    assert late.status_code == 504
    assert late.headers["content-type"] == PROBLEM
    assert late.json()["type"] == Problems.UPSTREAM_TIMEOUT.uri
    assert calls["work"] == 3  # two attempts, each cut at 200ms; then one quick call
    assert 0.4 <= elapsed < 0.8
    assert quick.status_code == 200


PROFILE = policy(
    "GET /work",
    "resilience: upstream\ntimeout: 150ms",
    extra="""\
resilience:
  upstream:
    retry: {attempts: 2, backoff: fixed, initial: 10ms, jitter: false}
    breaker: {failures: 1, reset: 30s}
    timeout: 5s
""",
)


async def test_route_uses_a_profile_and_its_own_keys_override(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, PROFILE, valkey_url, calls)
    async with running(app) as (c,):
        recovered = await c.get("/work?key=a&fail=1")
        late = await c.get("/work?key=b&sleep=1")  # the route's 150ms, not the profile's 5s
        refused = await c.get("/work?key=c")  # that failed request opened the breaker
    assert recovered.status_code == 200 and calls["a"] == 2
    assert late.status_code == 504
    assert refused.status_code == 503 and calls["c"] == 0


async def test_shared_breaker_falls_back_to_local_state_when_valkey_is_down(
    policy_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from policyroute.backends.embedded import start_valkey

    server = start_valkey()
    calls: Counter[str] = Counter()
    try:
        app = install(policy_dir, SHARED, server.url, calls)
        async with running(app) as (c,):
            assert (await c.get("/work")).status_code == 200
            server.stop()
            served = await c.get("/work")  # the breaker store is down: never a denial for that
            failures = [(await c.get("/work?fail=99")).status_code for _ in range(3)]
            refused = await c.get("/work")  # the local state machine took over and tripped
            server.restart()
            await asyncio.sleep(0.1)
            shared_again = await c.get("/work")  # Valkey's state (closed) applies again
    finally:
        server.stop()
    assert served.status_code == 200
    assert failures == [500, 500, 500]
    assert refused.status_code == 503 and refused.headers["retry-after"] in ("29", "30")
    assert shared_again.status_code == 200
    assert "uses its local state while Valkey is unreachable" in caplog.text
    assert "shares its state again" in caplog.text


WORKERS_POLICY = policy("GET /work", "breaker: {failures: 3, reset: 30s, shared: true}")


@pytest.fixture
def workers(policy_dir: Path, valkey_url: str) -> Iterator[str]:
    """Two uvicorn worker processes of one app on a free port: the base URL."""
    (policy_dir / "routes.yaml").write_text(WORKERS_POLICY)
    app = "tests.resilience.apps:worker_app"
    with uvicorn(policy_dir, valkey_url, app=app, workers=2, probe="/work?key=up") as served:
        yield served.base


async def _fresh_connections(base: str, path: str, n: int) -> list[httpx.Response]:
    """`n` concurrent requests, each on its own connection (so the kernel spreads them)."""

    async def one() -> httpx.Response:
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            return await c.get(path)

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_shared_breaker_across_uvicorn_worker_processes(workers: str) -> None:
    pids: set[str] = set()
    deadline = time.monotonic() + 15
    while len(pids) < 2 and time.monotonic() < deadline:  # until both processes serve
        pids.update(r.headers["x-pid"] for r in await _fresh_connections(workers, "/work", 16))
        await asyncio.sleep(0.1)
    assert len(pids) == 2
    failures = await _fresh_connections(workers, "/work?fail=99", 3)
    after = await _fresh_connections(workers, "/work", 24)
    assert [r.status_code for r in failures] == [500, 500, 500]
    assert {r.status_code for r in after} == {503}  # no process calls the handler any more
    assert {r.json()["type"] for r in after} == {Problems.CIRCUIT_OPEN.uri}


TIMEOUT_ONLY = policy("POST /work", "timeout: 150ms")


async def test_timeout_without_retry_streams_and_answers_504(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, TIMEOUT_ONLY, valkey_url, calls)
    async with running(app) as (c,):
        late = await c.post("/work?sleep=1", content=b"x")
        quick = await c.post("/work", content=b"payload")
    assert late.status_code == 504 and late.json()["type"] == Problems.UPSTREAM_TIMEOUT.uri
    assert "did not finish within 150ms" in late.json()["detail"]
    assert quick.status_code == 200 and quick.json()["body"] == "payload"
    assert calls["work"] == 2
