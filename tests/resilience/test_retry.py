"""Retry strategies as pure functions: waits, what is retried, and the retry loop."""

from __future__ import annotations

from collections import Counter

import pytest
import tenacity

from policyroute.language.policy import Retry
from policyroute.resilience import AttemptTimeout, RetryPlan, ServerError
from policyroute.resilience.retry import make_wait


def waits(spec: Retry, n: int = 6) -> list[float]:
    """The first `n` waits the strategy picks."""
    strategy = make_wait(spec)
    out = []
    for attempt in range(1, n + 1):
        state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        state.attempt_number = attempt
        out.append(strategy(state))
    return out


def test_exponential_doubles_up_to_max() -> None:
    spec = Retry(backoff="exponential", initial=0.1, max=1.0, jitter=False)
    assert waits(spec) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_exponential_jitter_stays_between_half_and_full_wait() -> None:
    spec = Retry(backoff="exponential", initial=0.1, max=1.0, jitter=True)
    full = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for _ in range(200):
        for got, top in zip(waits(spec), full, strict=True):
            assert top / 2 - 1e-9 <= got <= top + 1e-9
    assert len({round(w, 6) for w in waits(spec)}) > 1  # it does vary


def test_fixed_backoff_with_and_without_jitter() -> None:
    assert waits(Retry(backoff="fixed", initial=0.3, jitter=False)) == [0.3] * 6
    for got in waits(Retry(backoff="fixed", initial=0.3, jitter=True), 50):
        assert 0.15 - 1e-9 <= got <= 0.3 + 1e-9


def test_what_is_retried() -> None:
    plan = RetryPlan(Retry(on=["5xx", "timeout"]), (ConnectionError,), "t")
    assert plan.retryable(ServerError(503))
    assert plan.retryable(AttemptTimeout(1.0))
    assert plan.retryable(ConnectionResetError())  # a subclass of a listed exception
    assert not plan.retryable(ValueError())
    only_exceptions = RetryPlan(Retry(on=["ConnectionError"]), (ConnectionError,), "t")
    assert not only_exceptions.retryable(ServerError(500))
    assert not only_exceptions.retryable(AttemptTimeout(1.0))


async def test_loop_gives_up_after_attempts_and_reraises_the_last_error() -> None:
    calls: Counter[str] = Counter()
    plan = RetryPlan(Retry(attempts=4, backoff="fixed", initial=0, jitter=False), (), "t")

    async def always_502() -> None:
        calls["n"] += 1
        raise ServerError(502 + calls["n"])

    with pytest.raises(ServerError) as last:
        await plan.run(always_502)
    assert calls["n"] == 4 and last.value.status == 506


def test_describe() -> None:
    assert RetryPlan.describe_spec(Retry()) == "retry 3x exponential 100ms..2s"
    assert (
        RetryPlan.describe_spec(
            Retry(attempts=5, backoff="fixed", initial=0.25, jitter=False, on=["KeyError"])
        )
        == "retry 5x fixed 250ms no jitter on KeyError"
    )
