"""Events through broker faults: none lost, and a consumer never handles a message twice.

A route publishes an event per 2xx through policyroute's event bus, whose producer
batches; a policyroute consumer (a Shared subscription with a DLQ) handles them, failing
the first delivery of every seventh event (a transient error: it is redelivered and
handled then). Four clients post for the whole run while the broker (a dedicated
pulsar-lite, never the session's) is paused with SIGSTOP for longer than the send
timeout, or killed and restarted. After each fault:

- every request answered 201 (publication never holds or fails a response);
- the consumer handled the event of every request (no event lost);
- no message the consumer handled was delivered to it again (nor any failed one after it
  was handled), and nothing reached the DLQ.

Events published twice by the outbox (at least once, the same event id) are two messages;
they are counted in the report, not refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from policyroute.backends.embedded import EmbeddedPulsar, start_pulsar
from policyroute.events.consumer import Message, Worker
from tests.events.kit import Listener, install, outbox_entries, running, topic

from .kit import HOLD, broker_pid, freeze, thaw

POSTERS = 4
WARM = 0.3
AFTER = 0.5  # load after the fault ends
DELIVERY = 20.0  # at most this long for every event to be handled
QUIET = 1.0  # then this long without a new delivery, for late duplicates to show
FLAKY_EVERY = 7


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPulsar]:
    """A pulsar-lite broker of this module alone: it is paused and killed."""
    own = start_pulsar(tmp_path_factory.mktemp("fault-broker"))
    try:
        yield own
    finally:
        with contextlib.suppress(KeyError):
            thaw(broker_pid(own))
        own.stop()


@dataclass
class Handled:
    """What the consumer saw."""

    done: dict[str, str] = field(default_factory=dict)  # message id -> request id
    failed: set[str] = field(default_factory=set)  # message ids failed once on purpose
    again: list[str] = field(default_factory=list)  # handled message ids delivered again
    requests: Counter[str] = field(default_factory=Counter)  # request id -> times handled
    deliveries: int = 0
    last: float = 0.0


def _consumer(t: str, dlq: str, seen: Handled) -> Worker:
    worker = Worker()

    @worker.consumer(
        t, subscription="faults", dlq=dlq, max_redeliveries=2, retry_delay="100ms",
        initial_position="earliest",
    )  # fmt: skip
    async def handle(message: Message) -> None:
        seen.deliveries += 1
        seen.last = time.monotonic()
        request = str(message.json()["request_id"])
        mid = message.message_id
        if mid in seen.done:
            seen.again.append(mid)
            return
        n = int(request.rsplit("-", 1)[1])
        if n % FLAKY_EVERY == 0 and mid not in seen.failed:
            seen.failed.add(mid)
            raise RuntimeError("a transient failure: handled on redelivery")
        seen.done[mid] = request
        seen.requests[request] += 1

    return worker


async def _sigstop(broker: EmbeddedPulsar) -> None:
    pid = broker_pid(broker)
    freeze(pid)
    try:
        await asyncio.sleep(HOLD)
    finally:
        thaw(pid)


async def _sigkill(broker: EmbeddedPulsar) -> None:
    os.kill(broker_pid(broker), signal.SIGKILL)
    await asyncio.sleep(HOLD)
    await asyncio.to_thread(broker.stop)  # reaps it and forgets it
    await asyncio.to_thread(broker.restart)  # the same data, the same port


@pytest.mark.parametrize("fault", ["sigstop", "sigkill-restart"])
async def test_every_event_is_handled_once_through_a_broker_fault(
    fault: str, broker: EmbeddedPulsar, valkey_url: str, policy_dir: Path
) -> None:
    t, dlq = topic("faults"), topic("faults-dlq")
    policy = (
        "version: 1\nroutes:\n  POST /jobs:\n    public: true\n"
        f"    events: {{topic: {t}, fields: {{request: [n]}}}}\n"
    )
    app, engine = install(
        policy_dir, policy, valkey_url=valkey_url, pulsar_url=broker.url,
        events_send_timeout=0.5, events_flush_timeout=2.0, outbox_poll=0.1,
    )  # fmt: skip
    seen = Handled()
    worker = _consumer(t, dlq, seen)
    statuses: Counter[int] = Counter()
    published: set[str] = set()
    stop = asyncio.Event()

    async def poster(c: httpx.AsyncClient, k: int) -> None:
        n = 0
        while not stop.is_set():
            request = f"p{k}-{n}"
            n += 1
            r = await c.post("/jobs", json={"n": n}, headers={"X-Request-Id": request})
            statuses[r.status_code] += 1
            if r.status_code == 201:
                published.add(request)
            await asyncio.sleep(0.01)

    await worker.start(broker.url)
    try:
        async with Listener(broker.url, dlq) as dead:
            async with running(app) as c:
                posters = [asyncio.create_task(poster(c, k)) for k in range(POSTERS)]
                await asyncio.sleep(WARM)
                await (_sigstop(broker) if fault == "sigstop" else _sigkill(broker))
                await asyncio.sleep(AFTER)
                stop.set()
                await asyncio.gather(*posters)
                # The app keeps running: its relay publishes what waits in the outbox.
                deadline = time.monotonic() + DELIVERY
                while time.monotonic() < deadline and not published <= set(seen.requests):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # polls what the handler saw
                while time.monotonic() - seen.last < QUIET:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # until deliveries stop
                waiting = len(await outbox_entries(engine))
            dead_letters = await dead.take(100, wait=0.5)
    finally:
        await worker.stop(grace=2.0)

    problems: list[str] = []
    if set(statuses) != {201}:
        problems.append(f"the route answered {dict(statuses)}")
    lost = published - set(seen.requests)
    if lost:
        problems.append(
            f"{len(lost)} of {len(published)} events were never handled (lost; {waiting} "
            f"entries still in the outbox after {DELIVERY} s)"
        )
    if seen.again:
        problems.append(
            f"{len(seen.again)} deliveries were of messages the consumer had already handled "
            f"({len(set(seen.again))} messages)"
        )
    if dead_letters:
        names = Counter(
            "handled" if json.loads(m.data())["request_id"] in seen.requests else "unhandled"
            for m in dead_letters
        )
        problems.append(f"{len(dead_letters)} messages reached the DLQ ({dict(names)})")
    twice = sum(1 for n in seen.requests.values() if n > 1)
    report = (
        f"{fault}: {len(published)} events published, {seen.deliveries} deliveries, "
        f"{len(seen.failed)} failed once on purpose, {twice} events published twice by "
        "the outbox (two messages, one event id)"
    )
    print(report)
    if not published:
        problems.append("nothing was published: the load did not run")
    if problems:
        pytest.fail(report + "\n  " + "\n  ".join(problems), pytrace=False)
