"""The outbox relay: publishes saved events once the broker is back (at least once).

Every process with the "pulsar" service runs one relay; relays share the outbox through
one consumer group, and take over entries a crashed process left pending after
`outbox_claim_idle`. For each entry: publish to its topic with the same event id; when the
broker is away, leave it pending and back off (a broker outage never uses up attempts);
when the publication fails for the event's own reason, re-queue it with one more attempt;
after `max_attempts`, publish it to the DLQ topic. Without a DLQ topic, an exhausted or
unreadable entry is parked in a second stream (`<prefix>:{outbox}:parked`), never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Literal, Protocol

from ..errors import StorageError
from ._pulsar import is_transient, result_name
from .envelope import Event
from .metrics import EVENTS, OUTBOX_DEPTH
from .outbox import Entry, Outbox, OutboxError

log = logging.getLogger("policyroute")

Kind = Literal["done", "blocked", "retry", "park"]


class Publisher(Protocol):
    """What a relay needs of the bus that owns it: sending one event to its topic."""

    async def publish(self, event: Event, *, dlq: bool = False) -> None:
        """Send `event` to its topic (or its DLQ topic); raise on failure."""
        ...


async def _pause(event: asyncio.Event, seconds: float) -> None:
    """Wait until `event` is set, at most `seconds`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


@dataclass(slots=True)
class Result:
    """What to do with one outbox entry after a relay attempt."""

    kind: Kind
    entry_id: str
    attempts: int = 0
    error: str = ""


class Relay:
    """Drains the outbox into Pulsar."""

    def __init__(
        self, bus: Publisher, outbox: Outbox, *, batch: int, poll: float, claim_idle: float
    ) -> None:
        self.bus = bus
        self.outbox = outbox
        self.batch = batch
        self.poll = poll
        self.claim_idle = claim_idle
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    def wake(self) -> None:
        """Look at the outbox now (an event was just saved)."""
        self._wake.set()

    def stop(self) -> None:
        """Finish the batch in hand, then return from `run`.

        A batch cut off between publishing and acknowledging its entries would leave them
        pending, and another relay would publish them a second time.
        """
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Relay until stopped (or cancelled)."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                moved, blocked = await self.step()
            except StorageError as exc:
                log.warning("policyroute: outbox relay: %s", exc)
                moved, blocked = False, True
            if blocked:
                # Saved events do not cut a backoff short (the broker is what is away).
                await _pause(self._stop, backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            if not moved:
                self._wake.clear()
                await _pause(self._wake, self.poll)

    async def step(self) -> tuple[bool, bool]:
        """Relay one batch; (entries were read, the broker blocked some)."""
        depth, entries = await self.outbox.read(self.batch, self.claim_idle)
        OUTBOX_DEPTH.set(depth)
        if not entries:
            return False, False
        results = await asyncio.gather(*(self._one(e) for e in entries))
        done = [r.entry_id for r in results if r.kind == "done"]
        retry = [(r.entry_id, r.attempts, r.error) for r in results if r.kind == "retry"]
        park = [(r.entry_id, r.attempts, r.error) for r in results if r.kind == "park"]
        if done:
            depth = await self.outbox.done(done)
        if retry:
            depth = await self.outbox.move(retry)
        if park:
            depth = await self.outbox.move(park, park=True)
        OUTBOX_DEPTH.set(depth)
        return True, any(r.kind == "blocked" for r in results)

    async def _one(self, entry: Entry) -> Result:
        try:
            event = self.outbox.decode(entry)
        except OutboxError as exc:
            log.error("policyroute: outbox entry %s parked: %s", entry.id, exc)
            return Result("park", entry.id, entry.number("attempts", 0), "unreadable")
        dlq = event.attempts >= event.max_attempts
        if dlq and event.dlq is None:
            log.error(
                "policyroute: event %s of %s failed %d time(s) (%s) and %s has no `dlq`; "
                "parked in %s",
                event.id,
                event.route,
                event.attempts,
                event.error,
                event.route,
                self.outbox.parked_key,
            )
            return Result("park", entry.id, event.attempts, event.error)
        try:
            await self.bus.publish(event, dlq=dlq)
        except Exception as exc:
            if is_transient(exc):
                return Result("blocked", entry.id)
            if dlq:
                log.error(
                    "policyroute: DLQ %s refused event %s (%s); parked", event.dlq, event.id, exc
                )
                return Result("park", entry.id, event.attempts, result_name(exc))
            return Result("retry", entry.id, event.attempts + 1, result_name(exc))
        if dlq:
            log.warning(
                "policyroute: event %s of %s sent to DLQ %s after %d failed attempt(s) (%s)",
                event.id,
                event.route,
                event.dlq,
                event.attempts,
                event.error,
            )
        EVENTS.labels(event.route, "dlq" if dlq else "published").inc()
        return Result("done", entry.id)
