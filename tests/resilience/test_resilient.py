"""`@policyroute.resilient("name")` on plain coroutines: same breaker, retry and timeout."""

from __future__ import annotations

import gc
import inspect
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import REGISTRY

import policyroute
from policyroute import ConfigError
from policyroute.resilience import AttemptTimeout, CircuitOpen

from .apps import engine, install

PROFILES = """\
version: 1
resilience:
  db_primary:
    retry: {attempts: 3, backoff: fixed, initial: 10ms, jitter: false, on: [ConnectionError]}
    breaker: {failures: 2, reset: 30s, exclude: [KeyError]}
  slow_upstream:
    retry: {attempts: 2, backoff: fixed, initial: 10ms, jitter: false, on: [timeout]}
    timeout: 100ms
routes:
  GET /work:
    public: true
"""


@asynccontextmanager
async def installed(
    policy_dir: Path, valkey_url: str, policy: str = PROFILES
) -> AsyncIterator[None]:
    """An installed, running app whose policies define the profiles."""
    app = install(policy_dir, policy, valkey_url, Counter())
    async with LifespanManager(app):
        yield


def retries(target: str, outcome: str) -> float:
    """policyroute_retries_total for a target and outcome."""
    labels = {"target": target, "outcome": outcome}
    return REGISTRY.get_sample_value("policyroute_retries_total", labels) or 0.0


async def test_retries_configured_exceptions_and_trips_its_breaker(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()

    @policyroute.resilient("db_primary")
    async def query(fail: int) -> str:
        calls["query"] += 1
        if calls["query"] <= fail:
            raise ConnectionError("connection reset")
        return "rows"

    @policyroute.resilient("db_primary")
    async def down() -> str:
        calls["down"] += 1
        raise ConnectionError("refused")

    recovered_before = retries("db_primary", "recovered")
    async with installed(policy_dir, valkey_url):
        assert await query(2) == "rows"  # two retries, then success
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await down()
        with pytest.raises(CircuitOpen) as refused:
            await query(0)
    assert calls["query"] == 3
    assert calls["down"] == 6  # two calls, three attempts each: two breaker failures
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "30"
    assert retries("db_primary", "recovered") == recovered_before + 1


async def test_other_and_excluded_exceptions(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()

    @policyroute.resilient("db_primary")
    async def lookup(exc: type[Exception]) -> None:
        calls[exc.__name__] += 1
        raise exc("no")

    async with installed(policy_dir, valkey_url):
        for _ in range(3):
            with pytest.raises(KeyError):
                await lookup(KeyError)  # excluded: never a breaker failure
        with pytest.raises(ValueError, match="no"):
            await lookup(ValueError)  # not listed in `on`: not retried
        with pytest.raises(ValueError, match="no"):
            await lookup(ValueError)  # a failure, but the breaker needs 2 in a row
    assert calls == Counter({"KeyError": 3, "ValueError": 2})


async def test_timeout_per_attempt(policy_dir: Path, valkey_url: str) -> None:
    import anyio

    calls: Counter[str] = Counter()

    @policyroute.resilient("slow_upstream")
    async def fetch() -> None:
        calls["fetch"] += 1
        await anyio.sleep(1)

    async with installed(policy_dir, valkey_url):
        with pytest.raises(AttemptTimeout):
            await fetch()
    assert calls["fetch"] == 2


async def test_reload_applies_the_new_profile(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()

    @policyroute.resilient("db_primary")
    async def flaky() -> None:
        calls["flaky"] += 1
        raise ConnectionError("refused")

    app = install(policy_dir, PROFILES, valkey_url, Counter())
    async with LifespanManager(app):
        with pytest.raises(ConnectionError):
            await flaky()
        (policy_dir / "routes.yaml").write_text(PROFILES.replace("attempts: 3", "attempts: 5"))
        assert engine(app).reload() is None
        with pytest.raises(ConnectionError):
            await flaky()
    assert calls["flaky"] == 3 + 5


def _install_with_unknown_name(policy_dir: Path, valkey_url: str) -> tuple[list[str], int]:
    @policyroute.resilient("db_primry")
    async def query() -> None:
        return None

    line = inspect.getsourcelines(query.__wrapped__)[1]  # type: ignore[attr-defined]
    try:
        install(policy_dir, PROFILES, valkey_url, Counter())
    except ConfigError as exc:
        return [str(f) for f in exc.findings], line
    return [], line


def test_unknown_profile_name_refuses_install_at_the_decorator(
    policy_dir: Path, valkey_url: str
) -> None:
    try:
        findings, line = _install_with_unknown_name(policy_dir, valkey_url)
    finally:
        gc.collect()  # the decorated coroutine is gone: later installs do not see its name
    assert len(findings) == 1
    assert f"{__file__}:{line}:1: error[unknown-resilience-profile]" in findings[0]
    assert "did you mean 'db_primary'?" in findings[0]


def test_decorating_a_plain_function_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="coroutine functions"):
        policyroute.resilient("db_primary")(len)  # type: ignore[arg-type]
