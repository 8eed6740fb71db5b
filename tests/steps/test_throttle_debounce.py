"""Throttle and debounce limits in one process on a real Valkey.

Across two workers: tests/test_scale_out_patterns.py. Here: the delay bounds, nginx's
`delay`, headers, the quiet window restarting, what a join shares (and what it does not
charge), shadow mode, and the schema's refusals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from policyroute import ConfigError
from policyroute.admin import credits
from policyroute.errors import Problems
from tests.observability.kit import sample

from .stateful import engine, install, running

POLICY = """\
version: 1
routes:
  GET /throttled:
    public: true
    rate_limit:
      {key: ip, algorithm: throttle, capacity: 10, per: 1s, burst: 5, max_delay: 250ms}
  POST /throttled:
    public: true
    rate_limit: {key: ip, algorithm: throttle, capacity: 5, per: 1s, burst: 4, delay: 2}
  GET /debounced:
    public: true
    rate_limit: {key: ip, algorithm: debounce, per: 500ms}
  POST /joined:
    public: true
    rate_limit: {key: ip, algorithm: debounce, per: 2s, on_repeat: join}
  POST /charge:
    public: true
    credits: {cost: 1}
    rate_limit: {key: ip, algorithm: debounce, per: 2s, on_repeat: join}
  GET /other:
    public: true
    rate_limit:
      - {key: ip, algorithm: throttle, capacity: 10, per: 1s, burst: 1, enforce: false}
      - {key: ip, algorithm: debounce, per: 5s, enforce: false, name: quiet}
"""


def decided(outcome: str, route: str) -> float:
    """Rate-limit decisions counted so far."""
    return sample("policyroute_rate_limit_decisions_total", route=route, outcome=outcome)


async def test_a_throttle_bounds_the_wait_by_max_delay(policy_dir: Path, valkey_url: str) -> None:
    app = install(policy_dir, POLICY, valkey_url, Counter())
    delayed = decided("delayed", "GET /throttled")
    waits = sample("policyroute_throttle_wait_seconds_count", route="GET /throttled")
    async with running(app) as c:
        started = time.monotonic()

        async def one() -> tuple[int, float, str, str]:
            r = await c.get("/throttled")
            return (
                r.status_code,
                time.monotonic() - started,
                r.headers.get("ratelimit", ""),
                r.headers.get("retry-after", ""),
            )

        answers = sorted(await asyncio.gather(*(one() for _ in range(7))), key=lambda a: a[1])
    # 100 ms apart: waits of 0, 100 and 200 ms fit in 250 ms; 300 ms would not.
    assert Counter(a[0] for a in answers) == Counter({200: 3, 429: 4})
    ran = [a[1] for a in answers if a[0] == 200]
    assert ran[0] < 0.08 and 0.09 <= ran[1] < 0.19 and 0.19 <= ran[2] < 0.29
    assert {a[3] for a in answers if a[0] == 429} == {"1"}
    assert answers[-1][2].startswith('"throttle";r=')
    assert decided("delayed", "GET /throttled") == delayed + 2
    count = sample("policyroute_throttle_wait_seconds_count", route="GET /throttled")
    assert count == waits + 2


async def test_a_throttle_lets_delay_of_its_burst_go_at_once(
    policy_dir: Path, valkey_url: str
) -> None:
    app = install(policy_dir, POLICY, valkey_url, Counter())
    async with running(app) as c:
        started = time.monotonic()

        async def one() -> tuple[int, float]:
            r = await c.post("/throttled")
            return r.status_code, time.monotonic() - started

        answers = await asyncio.gather(*(one() for _ in range(6)))
    ran = sorted(t for status, t in answers if status == 200)
    # rate 5/s, burst 4, delay 2: three at once, then 200 and 400 ms later; one refused
    assert Counter(s for s, _ in answers) == Counter({200: 5, 429: 1})
    assert all(t < 0.1 for t in ran[:3])
    assert 0.19 <= ran[3] < 0.3 and 0.39 <= ran[4] < 0.5


async def test_every_repeat_restarts_the_quiet_window(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        first = await c.get("/debounced")
        await asyncio.sleep(0.3)
        second = await c.get("/debounced")
        await asyncio.sleep(0.3)  # 0.6 s after the first, 0.3 s after the repeat
        third = await c.get("/debounced")
        other = await c.get("/debounced?page=2")  # another request is no repeat
        await asyncio.sleep(0.6)
        quiet = await c.get("/debounced")
    assert [first.status_code, second.status_code, third.status_code] == [200, 429, 429]
    assert second.json()["type"] == Problems.RATE_LIMITED.uri
    assert "repeat of this request" in second.json()["detail"]
    assert second.headers["retry-after"] == "1"
    assert (other.status_code, quiet.status_code) == (200, 200)
    assert calls["stamp"] == 3


async def test_a_join_shares_the_first_response(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    joined = decided("joined", "POST /joined")
    async with running(app) as c:
        answers = await asyncio.gather(
            *(c.post("/joined?sleep=0.2", json={"n": 1}) for _ in range(5))
        )
        await asyncio.sleep(0.3)
        # After the first answered, within the window: its stored response at once.
        late = await c.post("/joined?sleep=0.2", json={"n": 1})
    assert [r.status_code for r in answers] == [200] * 5
    assert len({r.json()["run"] for r in [*answers, late]}) == 1
    assert sorted(str(r.headers.get("x-debounce")) for r in answers) == ["None"] + ["joined"] * 4
    assert late.headers["x-debounce"] == "joined"
    assert calls["stamp"] == 1
    assert decided("joined", "POST /joined") == joined + 5


async def test_a_joined_request_is_not_charged(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    who = "127.0.0.1"
    async with running(app) as c:
        store = engine(app).services["valkey"]
        await credits.grant(store, who, 10, ip=True)
        answers = await asyncio.gather(
            *(c.post("/charge?sleep=0.2", json={"n": 1}) for _ in range(4))
        )
        left = await credits.show(store, who, ip=True)
        assert calls["charge"] == 1
        broken = await asyncio.gather(
            *(c.post("/charge?status=599&sleep=0.2", json={"n": 2}) for _ in range(3)),
            return_exceptions=True,
        )
        unavailable = await asyncio.gather(
            *(c.post("/charge?status=503&sleep=0.2", json={"n": 3}) for _ in range(3))
        )
    assert [r.status_code for r in answers] == [200] * 4
    assert left.total == 9
    # The first raised (refunded): nothing to share, the repeats are told to retry.
    raised = [r for r in broken if isinstance(r, RuntimeError)]
    refused = [r for r in broken if isinstance(r, httpx.Response)]
    assert len(raised) == 1 and [r.status_code for r in refused] == [429, 429]
    assert {r.headers.get("retry-after") for r in refused} == {"1"}
    # A response the handler answered is shared whatever its status.
    assert Counter(r.status_code for r in unavailable) == Counter({503: 3})
    assert Counter(r.headers.get("x-debounce") for r in unavailable) == {None: 1, "joined": 2}
    assert calls["charge"] == 3


async def test_shadowed_throttle_and_debounce_never_wait_nor_refuse(
    policy_dir: Path, valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    route = "GET /other"
    before = {o: decided(o, route) for o in ("shadow_delayed", "shadow_limited")}
    with caplog.at_level(logging.WARNING, logger="policyroute.shadow"):
        async with running(app) as c:
            started = time.monotonic()
            answers = await asyncio.gather(*(c.get("/other") for _ in range(4)))
            took = time.monotonic() - started
    assert [r.status_code for r in answers] == [200] * 4 and calls["other"] == 4
    assert took < 0.2  # a shadowed throttle never delays
    # The first goes; the three repeats would be refused by the debounce (the first
    # refusal of a request is the one recorded).
    assert decided("shadow_limited", route) == before["shadow_limited"] + 3
    assert "GET /other would be refused by rate_limit (rate-limited, 429)" in caplog.text


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ("{algorithm: throttle, capacity: 5, per: 1s}", "a throttle needs `burst`"),
        ("{algorithm: throttle, capacity: 5, per: 1s, burst: 1, delay: 2}", "exceeds `burst`"),
        ("{algorithm: throttle, capacity: 5, refill: 2, per: 1s, burst: 1}", "not `refill`"),
        ("{algorithm: debounce, capacity: 5, per: 1s}", "drop `capacity`"),
        ("{algorithm: debounce}", "needs a positive `per`"),
        ("{capacity: 5, per: 1s, burst: 3}", "applies to throttle limits only"),
        ("{capacity: 5, per: 1s, on_repeat: join}", "applies to debounce limits only"),
        ("{algorithm: debounce, per: 1s, lease: 5s}", "applies to `on_repeat: join` only"),
    ],
)
def test_the_schema_refuses_what_a_limit_cannot_mean(
    policy_dir: Path, valkey_url: str, limit: str, message: str
) -> None:
    policy = f"version: 1\nroutes:\n  GET /other:\n    public: true\n    rate_limit: {limit}\n"
    with pytest.raises(ConfigError, match=message):
        install(policy_dir, policy, valkey_url, Counter())


def test_a_join_does_not_mix_with_cache_or_idempotency(policy_dir: Path, valkey_url: str) -> None:
    policy = """\
version: 1
routes:
  POST /jobs:
    public: true
    idempotency: {}
    rate_limit: {key: ip, algorithm: debounce, per: 1s, on_repeat: join}
"""
    with pytest.raises(ConfigError, match="drop `idempotency`"):
        install(policy_dir, policy, valkey_url, Counter())
