"""A guard: breaker (outermost, one call per request), then retry, then a timeout per attempt."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from .._types import format_duration
from ..language.policy import Breaker, Resilience, Retry
from .breaker import CircuitBreaker
from .names import resolve_all
from .retry import AttemptTimeout, RetryPlan

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Spec:
    """Resolved resilience settings: what a route or profile asks for, exceptions imported."""

    retry: Retry | None = None
    breaker: Breaker | None = None
    timeout: float | None = None
    profile: str | None = None
    retry_on: tuple[type[BaseException], ...] = field(default=())
    exclude: tuple[type[BaseException], ...] = field(default=())

    @classmethod
    def build(
        cls,
        retry: Retry | None,
        breaker: Breaker | None,
        timeout: float | None,
        profile: str | None = None,
    ) -> Spec:
        """Resolve exception names; ValueError names the first unknown one."""
        return cls(
            retry,
            breaker,
            timeout,
            profile,
            resolve_all(retry.exceptions) if retry is not None else (),
            resolve_all(breaker.exclude) if breaker is not None else (),
        )

    @classmethod
    def of_profile(cls, name: str, profile: Resilience) -> Spec:
        """The settings of a named profile."""
        return cls.build(profile.retry, profile.breaker, profile.timeout, name)

    @property
    def empty(self) -> bool:
        """True when nothing is asked for."""
        return self.retry is None and self.breaker is None and self.timeout is None

    @property
    def retries(self) -> bool:
        """True when a failed attempt may be tried again."""
        return self.retry is not None and self.retry.attempts > 1

    def fingerprint(self) -> str:
        """A stable text of the settings, so state survives a reload that keeps them."""
        return json.dumps(
            [
                self.retry.model_dump(mode="json") if self.retry else None,
                self.breaker.model_dump(mode="json") if self.breaker else None,
                self.timeout,
            ],
            sort_keys=True,
        )

    def lease(self) -> float:
        """The longest one guarded call may take, bounding a shared half-open trial slot."""
        if self.retry is not None and self.retry.deadline is not None:
            return self.retry.deadline
        if self.timeout is not None:
            attempts = self.retry.attempts if self.retry is not None else 1
            wait = self.retry.max if self.retry is not None else 0.0
            return attempts * self.timeout + (attempts - 1) * wait
        return self.breaker.reset if self.breaker is not None else 30.0

    def describe(self) -> str:
        """`breaker 5 failures/30s (shared), retry 3x exponential 100ms..2s, timeout 2s`."""
        parts: list[str] = []
        spec = self.breaker
        if spec is not None:
            text = f"breaker {spec.failures} failures/{format_duration(spec.reset)}"
            if spec.half_open_calls != 1 or spec.success_threshold != 1:
                text += (
                    f" half-open {spec.half_open_calls} trial(s), "
                    f"{spec.success_threshold} success(es) to close"
                )
            if spec.exclude:
                text += " except " + ",".join(spec.exclude)
            parts.append(text + (" (shared)" if spec.shared else ""))
        if self.retry is not None:
            parts.append(RetryPlan.describe_spec(self.retry))
        if self.timeout is not None:
            parts.append(f"timeout {format_duration(self.timeout)}")
        text = ", ".join(parts)
        return f"profile {self.profile}: {text}" if self.profile else text


class Guard:
    """Breaker, retry and timeout around one kind of call; shared by routes and `resilient`."""

    def __init__(self, target: str, spec: Spec, breaker: CircuitBreaker | None = None) -> None:
        self.target = target
        self.spec = spec
        self.breaker = breaker
        self.retry = (
            RetryPlan(spec.retry, spec.retry_on, target) if spec.retry is not None else None
        )
        self.timeout = spec.timeout
        self.deadline = spec.retry.deadline if spec.retry is not None else None

    async def run(self, call: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """Run `call` under the breaker, retrying when allowed, each attempt time-limited."""
        breaker = self.breaker
        if breaker is None:
            return await self._attempts(call, retry)
        ticket = await breaker.admit()
        try:
            result = await self._attempts(call, retry)
        except Exception as exc:
            await breaker.record(ticket, exc)
            raise
        except BaseException:
            # Cancelled (the client went away): no verdict on the callee; free its slot.
            with anyio.CancelScope(shield=True):
                await breaker.release(ticket)
            raise
        await breaker.record(ticket, None)
        return result

    async def _attempts(self, call: Callable[[], Awaitable[T]], retry: bool) -> T:
        plan = self.retry if retry else None
        if self.timeout is None and self.deadline is None:
            return await (plan.run(call) if plan is not None else call())
        started = time.monotonic()

        async def limited() -> T:
            limit = self._limit(started)
            if limit <= 0:
                raise AttemptTimeout(0.0)
            with anyio.move_on_after(limit):
                return await call()
            raise AttemptTimeout(limit)

        return await (plan.run(limited) if plan is not None else limited())

    def _limit(self, started: float) -> float:
        """This attempt's time: the `timeout`, but never past the overall deadline."""
        limits = [self.timeout] if self.timeout is not None else []
        if self.deadline is not None:
            limits.append(self.deadline - (time.monotonic() - started))
        return min(limits)
