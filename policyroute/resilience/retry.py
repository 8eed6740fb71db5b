"""Retry plans: a `retry` policy as tenacity strategies (stop, wait, retry-if)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tenacity
from tenacity.asyncio import AsyncRetrying

from .._types import format_duration
from ..language.policy import Retry
from .metrics import RETRIES

T = TypeVar("T")


class AttemptTimeout(TimeoutError):  # noqa: N818 - a TimeoutError, named for what timed out
    """One attempt ran past its time limit (the `timeout`, or what is left of the deadline)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        super().__init__(f"the call did not finish within {format_duration(limit)}")


class ServerError(Exception):
    """An attempt that answered with a 5xx status: a failure, retried when `on` has 5xx."""

    def __init__(self, status: int, response: Any = None) -> None:
        self.status = status
        self.response = response
        super().__init__(f"the handler answered {status}")


def make_wait(spec: Retry) -> tenacity.wait.wait_base:
    """The backoff: exponential (initial * 2^n, capped at max) or fixed (initial).

    With `jitter` each wait is drawn uniformly from [w/2, w] ("equal jitter"), so waits of
    many clients spread out while no wait exceeds `max`.
    """
    if spec.backoff == "fixed":
        if not spec.jitter:
            return tenacity.wait_fixed(spec.initial)
        half = spec.initial / 2
        return tenacity.wait_fixed(half) + tenacity.wait_random(0, half)
    if not spec.jitter:
        return tenacity.wait_exponential(multiplier=spec.initial, max=spec.max)
    half, top = spec.initial / 2, spec.max / 2
    return tenacity.wait_exponential(multiplier=half, max=top) + tenacity.wait_random_exponential(
        multiplier=half, max=top
    )


class RetryPlan:
    """When to try again, how long to wait, and when to give up; built once per route."""

    def __init__(
        self, spec: Retry, exceptions: tuple[type[BaseException], ...], target: str
    ) -> None:
        self.spec = spec
        self.attempts = spec.attempts
        self.deadline = spec.deadline
        self.on_5xx = "5xx" in spec.on
        self.on_timeout = "timeout" in spec.on
        self.exceptions = exceptions
        self.target = target
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(spec.attempts)
        if spec.deadline is not None:
            # Never sleep into the deadline: stop when the next wait would cross it.
            stop = stop | tenacity.stop_before_delay(spec.deadline)
        self._template = AsyncRetrying(
            stop=stop,
            wait=make_wait(spec),
            retry=tenacity.retry_if_exception(self.retryable),
            before_sleep=self._counted,
            reraise=True,
        )

    def retryable(self, exc: BaseException) -> bool:
        """Whether a failed attempt is tried again (never a 4xx: those are not failures)."""
        if isinstance(exc, ServerError):
            return self.on_5xx
        if isinstance(exc, TimeoutError) and self.on_timeout:
            return True
        return isinstance(exc, self.exceptions)

    def _counted(self, state: tenacity.RetryCallState) -> None:
        RETRIES.labels(self.target, "retry").inc()

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Call `attempt` until it succeeds, fails for good, or the plan gives up."""
        # A fresh copy per call: a Retrying keeps its statistics in a thread-local, which
        # concurrent tasks of one event loop would otherwise share.
        retrying = self._template.copy()

        async def once() -> T:
            # tenacity awaits only what a coroutine *function* returns: never pass a lambda.
            return await attempt()

        try:
            result: T = await retrying(once)
        except BaseException as exc:
            self._gave_up(retrying, exc)
            raise
        if retrying.statistics.get("attempt_number", 1) > 1:
            RETRIES.labels(self.target, "recovered").inc()
        return result

    def _gave_up(self, retrying: AsyncRetrying, exc: BaseException) -> None:
        tried = int(retrying.statistics.get("attempt_number", 1))
        if not isinstance(exc, Exception) or not self.retryable(exc):
            if tried > 1:
                RETRIES.labels(self.target, "exhausted").inc()
            return
        RETRIES.labels(self.target, "exhausted" if tried >= self.attempts else "deadline").inc()

    @staticmethod
    def describe_spec(spec: Retry) -> str:
        """`retry 3x exponential 100ms..2s deadline 5s`."""
        if spec.backoff == "fixed":
            text = f"retry {spec.attempts}x fixed {format_duration(spec.initial)}"
        else:
            text = (
                f"retry {spec.attempts}x exponential "
                f"{format_duration(spec.initial)}..{format_duration(spec.max)}"
            )
        if not spec.jitter:
            text += " no jitter"
        if spec.deadline is not None:
            text += f" deadline {format_duration(spec.deadline)}"
        if spec.on != ["5xx", "timeout"]:
            text += " on " + ", ".join(spec.on)
        return text
