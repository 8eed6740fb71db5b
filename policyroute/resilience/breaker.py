"""Circuit breakers driven from asyncio: pybreaker's state machine, or shared through Valkey.

`LocalBreaker` keeps pybreaker's `CircuitBreaker` and `CircuitMemoryStorage` and splits its
synchronous `call` in two: `admit` (the open-state check and the move to half-open) before
the awaited call, and `record` (the outcome replayed through `CircuitBreaker.call`) after
it, so the failure counting, trip, success threshold and exclusions are pybreaker's own.
`SharedBreaker` keeps the same state in Valkey, changed only inside Lua scripts on Valkey's
clock, so every worker agrees; when Valkey is unreachable it uses its local breaker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol

import anyio
import pybreaker

from ..backends.keys import route_id
from ..backends.valkey import Arg, Store
from ..errors import Denial, Problems, StorageError
from ..language.policy import Breaker
from .metrics import BREAKER_STATE, BREAKER_TRANSITIONS, STATE_VALUES

log = logging.getLogger("policyroute")

CLOSED, HALF_OPEN, OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_HALF_OPEN, pybreaker.STATE_OPEN
# How long a caller refused because every half-open trial slot is taken should wait.
BUSY_RETRY_AFTER = 1.0


class CircuitOpen(Denial):
    """A breaker refused the call: 503 problem+json with Retry-After when it reaches HTTP."""

    def __init__(self, breaker: str, retry_after: float) -> None:
        self.breaker = breaker
        self.retry_after = retry_after
        seconds = max(1, math.ceil(retry_after))
        super().__init__(
            Problems.CIRCUIT_OPEN,
            f"the circuit breaker of {breaker} is open; retry in {seconds}s",
            headers={"Retry-After": str(seconds)},
        )


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted call: the breaker generation it was admitted in, and its trial slot."""

    generation: int
    trial: bool = False
    token: str = ""
    shared: bool = False
    clean: bool = False  # closed with no failures counted: a success changes nothing


class CircuitBreaker(Protocol):
    """What the guard asks of a breaker."""

    label: str

    async def admit(self) -> Ticket:
        """Admit one call or raise CircuitOpen."""
        ...

    async def record(self, ticket: Ticket, error: BaseException | None) -> None:
        """Record how an admitted call ended (`error` None means success)."""
        ...

    async def release(self, ticket: Ticket) -> None:
        """Forget an admitted call that was abandoned (cancelled) without a verdict."""
        ...


def transition(label: str, old: str, new: str) -> None:
    """Log, count and show one state change."""
    log.warning("policyroute: circuit breaker %s: %s -> %s", label, old, new)
    BREAKER_TRANSITIONS.labels(label, old, new).inc()
    BREAKER_STATE.labels(label).set(STATE_VALUES[new])


class _Failed(Exception):  # noqa: N818 - a replayed outcome, never seen outside this module
    """The replayed outcome of a call that failed."""


def _fail() -> NoReturn:
    raise _Failed


def _succeed() -> None:
    return None


def _excluding(cls: type[BaseException]) -> Any:
    # A predicate rather than the class: pybreaker tests `type(x) is type`, which misses
    # exception classes with another metaclass and would then call the class itself.
    return lambda exc: isinstance(exc, cls)


class _Listener(pybreaker.CircuitBreakerListener):
    """Turns pybreaker's state changes into logs, metrics and a new generation."""

    def __init__(self, owner: LocalBreaker) -> None:
        self.owner = owner

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        """Called by pybreaker on every change of state."""
        self.owner.changed(old_state.name if old_state is not None else CLOSED, new_state.name)


class LocalBreaker:
    """pybreaker's state machine in this process, admitted and recorded from asyncio."""

    def __init__(
        self, label: str, spec: Breaker, exclude: tuple[type[BaseException], ...] = ()
    ) -> None:
        self.label = label
        self.spec = spec
        self.storage = pybreaker.CircuitMemoryStorage(CLOSED)
        self.generation = 0
        self.trials = 0
        self.cb = pybreaker.CircuitBreaker(
            fail_max=spec.failures,
            reset_timeout=spec.reset,
            success_threshold=spec.success_threshold,
            exclude=[_excluding(c) for c in exclude],
            listeners=[_Listener(self)],
            state_storage=self.storage,
            name=label,
            throw_new_error_on_trip=False,
        )
        BREAKER_STATE.labels(label).set(0)

    @property
    def state(self) -> str:
        """closed, half-open or open."""
        return str(self.cb.current_state)

    def changed(self, old: str, new: str) -> None:
        """A new state: calls admitted before it no longer count, trial slots are freed."""
        self.generation += 1
        self.trials = 0
        transition(self.label, old, new)

    def is_failure(self, error: BaseException | None) -> bool:
        """Whether an outcome counts against the breaker (pybreaker's exclusions apply)."""
        return error is not None and bool(self.cb.is_system_error(error))

    def remaining_open(self) -> float:
        """Seconds until an open breaker lets a trial call through."""
        opened_at: datetime | None = self.storage.opened_at
        if opened_at is None:
            return 0.0
        return self.spec.reset - (datetime.now(UTC) - opened_at).total_seconds()

    def admit_now(self) -> Ticket:
        """Admit without awaiting (so no other task interleaves), or raise CircuitOpen."""
        if self.state == OPEN:
            left = self.remaining_open()
            if left > 0:
                raise CircuitOpen(self.label, left)
            self.cb.half_open()
        if self.state == HALF_OPEN:
            if self.trials >= self.spec.half_open_calls:
                raise CircuitOpen(self.label, BUSY_RETRY_AFTER)
            self.trials += 1
            return Ticket(self.generation, trial=True)
        return Ticket(self.generation)

    def record_now(self, ticket: Ticket, error: BaseException | None) -> None:
        """Replay the outcome through pybreaker, unless the state moved on meanwhile."""
        if ticket.generation != self.generation:
            return
        if ticket.trial:
            self.trials = max(0, self.trials - 1)
        with contextlib.suppress(_Failed):
            self.cb.call(_fail if self.is_failure(error) else _succeed)

    def release_now(self, ticket: Ticket) -> None:
        """Free the trial slot of an abandoned call."""
        if ticket.trial and ticket.generation == self.generation:
            self.trials = max(0, self.trials - 1)

    async def admit(self) -> Ticket:
        """Admit one call or raise CircuitOpen."""
        return self.admit_now()

    async def record(self, ticket: Ticket, error: BaseException | None) -> None:
        """Record how an admitted call ended."""
        self.record_now(ticket, error)

    async def release(self, ticket: Ticket) -> None:
        """Forget an abandoned call."""
        self.release_now(ticket)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SharedBreaker:
    """One breaker for every worker: state, counters and trial slots live in Valkey."""

    def __init__(
        self,
        label: str,
        identity: str,
        spec: Breaker,
        store: Store,
        local: LocalBreaker,
        lease: float,
    ) -> None:
        self.label = label
        self.spec = spec
        self.store = store
        self.local = local
        tag = "brk:" + route_id(identity)
        self.keys = [store.key(tag, "state"), store.key(tag, "trials")]
        self.reset_ms = max(1, round(spec.reset * 1000))
        self.lease_ms = max(1000, round(lease * 1000))
        # Long enough to outlive an open period; an idle closed breaker may simply expire.
        self.ttl_ms = max(3_600_000, 2 * self.reset_ms)
        self.degraded = False

    def _down(self, exc: StorageError) -> None:
        if not self.degraded:
            self.degraded = True
            log.warning(
                "policyroute: circuit breaker %s uses its local state while Valkey is "
                "unreachable: %s",
                self.label,
                exc,
            )

    def _up(self) -> None:
        if self.degraded:
            self.degraded = False
            log.warning("policyroute: circuit breaker %s shares its state again", self.label)

    def _seen(self, state: str, moved_from: str) -> None:
        if moved_from:
            transition(self.label, moved_from, state)
        else:
            BREAKER_STATE.labels(self.label).set(STATE_VALUES.get(state, 0))

    async def admit(self) -> Ticket:
        """Admit one call (Lua on Valkey's clock) or raise CircuitOpen."""
        token = uuid.uuid4().hex
        args: list[Arg] = [
            self.reset_ms,
            self.spec.half_open_calls,
            token,
            self.lease_ms,
            self.ttl_ms,
        ]
        try:
            reply = await self.store.run(
                "breaker_admit", self.keys, args, operation="breaker admit", fail_open=True
            )
        except StorageError as exc:
            self._down(exc)
            return self.local.admit_now()
        self._up()
        verdict, generation, wait_ms, failures = (
            _text(reply[0]),
            int(reply[1]),
            int(reply[2]),
            int(reply[3]),
        )
        moved_from = _text(reply[4])
        state = {"trial": HALF_OPEN, "busy": HALF_OPEN}.get(verdict, verdict)
        self._seen(state, moved_from)
        if verdict in ("open", "busy"):
            raise CircuitOpen(self.label, wait_ms / 1000)
        if verdict == "trial":
            return Ticket(generation, trial=True, token=token, shared=True)
        return Ticket(generation, shared=True, clean=failures == 0)

    async def record(self, ticket: Ticket, error: BaseException | None) -> None:
        """Record the outcome in Valkey (it applies only if the state has not moved on)."""
        if not ticket.shared:
            self.local.record_now(ticket, error)
            return
        failed = self.local.is_failure(error)
        if not failed and ticket.clean:
            return  # closed, nothing counted: a success changes nothing
        await self._record(ticket, "failure" if failed else "success")

    async def release(self, ticket: Ticket) -> None:
        """Free the trial slot of an abandoned call."""
        if not ticket.shared:
            self.local.release_now(ticket)
        elif ticket.token:
            await self._record(ticket, "release")

    async def _record(self, ticket: Ticket, outcome: str) -> None:
        args: list[Arg] = [
            outcome,
            ticket.generation,
            self.spec.failures,
            self.spec.success_threshold,
            ticket.token,
            self.ttl_ms,
        ]
        # Shielded: the verdict on a finished call must land even if the request is cancelled.
        with anyio.CancelScope(shield=True):
            try:
                reply = await self.store.run(
                    "breaker_record", self.keys, args, operation="breaker record", fail_open=True
                )
            except StorageError as exc:
                self._down(exc)
                return
        self._up()
        if outcome != "release":
            self._seen(_text(reply[0]), _text(reply[1]))
