"""Batches: a poison message sends back only itself; handled messages are not handled again."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from typing import Any

import pulsar
import pulsar.asyncio
import pytest

from policyroute.events.bus import EventBus
from policyroute.events.consumer import Message, Worker
from policyroute.events.envelope import EVENT_ID, Event, new_event_id

from .kit import QUIET, eventually, topic

GOOD, POISON, MAX_REDELIVERIES = 60, 6, 2


async def _through_the_bus(url: str, events: list[Event]) -> None:
    bus = EventBus(url, store=None)
    await bus.start()
    for event in events:
        bus.emit(event)
    await bus.stop()  # publishes what is pending first
    assert bus.dropped == 0


async def _through_a_batching_producer(url: str, events: list[Event]) -> None:
    # batches of at most 16: some hold no poison message, some one, some two
    client = pulsar.asyncio.Client(url, logger=QUIET)
    try:
        producer = await client.create_producer(
            events[0].topic, batching_max_messages=16, batching_max_publish_delay_ms=50
        )
        await asyncio.gather(
            *(producer.send(e.payload, properties=e.message_properties()) for e in events)
        )
        await producer.close()
    finally:
        await client.close()


async def _dead_letters(url: str, dlq: str, count: int) -> dict[str, Any]:
    """The DLQ topic from the earliest message, by message id: `count`, then 0.5 s more."""
    client = pulsar.asyncio.Client(url, logger=QUIET)
    got: dict[str, Any] = {}  # pulsar-lite may deliver one message to a reader more than once
    try:
        sub = await client.subscribe(
            dlq, "test-dlq", initial_position=pulsar.InitialPosition.Earliest
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                while len(got) < count:
                    message = await sub.receive()
                    got[str(message.message_id())] = message
        with contextlib.suppress(TimeoutError):
            while True:
                message = await asyncio.wait_for(sub.receive(), 0.5)
                got[str(message.message_id())] = message
        await sub.close()
    finally:
        await client.close()
    return got


@pytest.mark.parametrize("publish", [_through_the_bus, _through_a_batching_producer])
async def test_a_poison_message_in_a_batch_is_redelivered_and_dead_lettered_alone(
    pulsar_url: str, publish: Any
) -> None:
    # Before: the subscription acknowledged whole batches and the client dead-lettered whole
    # batches; through the bus (all 66 in one batch) every good message was handled 3 times
    # and all 60 went to the DLQ with the 6 poison ones.
    t, dlq = topic("mixed"), topic("mixed-dlq")
    events = [
        Event(new_event_id(), "POST /jobs", t, json.dumps({"n": n}).encode())
        for n in range(GOOD + POISON)
    ]
    poison = {e.id for n, e in enumerate(events) if n % 11 == 5}
    good = {e.id for e in events} - poison

    handled: Counter[str] = Counter()
    attempts: dict[str, list[int]] = {}
    batches: Counter[str] = Counter()
    worker = Worker()

    @worker.consumer(
        t,
        subscription="mixed",
        dlq=dlq,
        max_redeliveries=MAX_REDELIVERIES,
        retry_delay="100ms",
        initial_position="earliest",
    )
    async def handle(message: Message) -> None:
        assert message.event_id is not None
        if message.event_id in poison:
            attempts.setdefault(message.event_id, []).append(message.redelivery_count)
            raise ValueError("poison")
        handled[message.event_id] += 1
        batches[message.message_id.rsplit(",", 2)[0]] += 1  # "(ledger,entry"

    await publish(pulsar_url, events)
    await worker.start(pulsar_url)
    try:
        await eventually(lambda: all(len(attempts.get(i, [])) > MAX_REDELIVERIES for i in poison))
        dead = await _dead_letters(pulsar_url, dlq, POISON)
    finally:
        await worker.stop()

    dead_ids = Counter(m.properties()[EVENT_ID] for m in dead.values())
    seen = (
        f"{len(batches)} batches; good messages handled {sum(handled.values())} times; "
        f"in the DLQ {len(dead_ids.keys() & good)} good, {len(dead_ids.keys() & poison)} poison"
    )
    assert len(batches) < GOOD, seen  # the topic is batched
    assert handled == Counter(dict.fromkeys(good, 1)), seen  # every good message exactly once
    assert dead_ids == Counter(dict.fromkeys(poison, 1)), seen  # only the poison ones, once
    # each: one delivery and MAX_REDELIVERIES redeliveries, after a negative acknowledgement
    assert attempts == {i: list(range(MAX_REDELIVERIES + 1)) for i in poison}, seen
    for message in dead.values():
        assert message.properties()["REAL_TOPIC"] == t
        assert message.properties()["ORIGIN_MESSAGE_ID"].startswith("(")
        assert json.loads(message.data())["n"] % 11 == 5
