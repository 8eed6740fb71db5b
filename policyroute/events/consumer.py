"""Pulsar consumers: `@policyroute.consumer(topic, subscription=...)` and the Worker that runs them.

```python
import policyroute

@policyroute.consumer("persistent://public/default/io-jobs", subscription="billing",
                      dlq="persistent://public/default/io-jobs-billing-dlq",
                      max_redeliveries=3, retry_delay="2s")
async def bill(message: policyroute.Message) -> None:
    event = message.json()
    ...
```

A handler that returns acknowledges the message; one that raises negatively acknowledges
it, so Pulsar redelivers it after `retry_delay`; when it raises on the last of
`max_redeliveries` redeliveries the worker publishes the message to the `dlq` topic (default
`<topic>-<subscription>-DLQ`, as Pulsar's dead letter policy names it; same payload, key and
properties, plus `REAL_TOPIC` and `ORIGIN_MESSAGE_ID`), then acknowledges it. Subscriptions
are `Shared`, so several workers split a topic. `resilience="name"` wraps the handler with
the named resilience profile (`policyroute.resilient`; the profile comes from the installed
policies, so the worker module imports the app that calls `install`). `policyroute worker
MODULE[:ATTR]` runs them.

Batches (policyroute's event bus, like most producers, batches): the broker acknowledges and
redelivers whole entries, and one entry holds a whole batch. A message that fails sends its
batch back, so the worker remembers which messages of a batch it has handled or
dead-lettered (the last `SETTLED_MAX`) and acknowledges them again without calling the
handler: each is handled once by this worker. Dead-lettering is per message too, by the
worker rather than the client's dead letter policy, which moves a whole batch to the DLQ,
good messages included. Redeliveries of a batch that reach another worker of the
subscription, or a restarted one, can be handled again (at least once, as always).
Batch-index acknowledgement is not used: it needs `acknowledgmentAtBatchIndexLevelEnabled`
on the broker (off by default before PIP-391), and pulsar-lite, the embedded broker, takes
a batch-index acknowledgement for the whole batch, losing the failed message.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .._types import parse_duration, parse_topic
from ..errors import PolicyrouteError, StorageError
from ..observability.tracing import consumer_span
from ._pulsar import async_client, close_client, release_clients, result_name
from .envelope import EVENT_ID
from .metrics import CONSUMED

log = logging.getLogger("policyroute")

Position = Literal["latest", "earliest"]

# Messages of batches remembered as handled or dead-lettered (then the oldest batch goes).
SETTLED_MAX = 100_000
# Properties a dead-lettered message gains, named as Pulsar's own dead letter policy does.
REAL_TOPIC = "REAL_TOPIC"
ORIGIN_MESSAGE_ID = "ORIGIN_MESSAGE_ID"

# A batch: consumer name, partition, ledger and entry of the message id.
Entry = tuple[str, int, int, int]


@dataclass(frozen=True, slots=True)
class Message:
    """One message as a consumer handler sees it."""

    data: bytes
    properties: Mapping[str, str]
    topic: str
    message_id: str
    redelivery_count: int

    @property
    def event_id(self) -> str | None:
        """The policyroute event id (message property `event_id`), when there is one."""
        return self.properties.get(EVENT_ID)

    def json(self) -> Any:
        """The payload parsed as JSON (a policyroute event envelope is a JSON object)."""
        return json.loads(self.data)

    @classmethod
    def of(cls, raw: Any) -> Message:
        """Wrap a `pulsar.Message`."""
        return cls(
            data=bytes(raw.data()),
            properties=dict(raw.properties()),
            topic=str(raw.topic_name()),
            message_id=str(raw.message_id()),
            redelivery_count=int(raw.redelivery_count()),
        )


MessageHandler = Callable[[Message], Awaitable[None]]
H = TypeVar("H", bound=MessageHandler)


@dataclass(frozen=True, slots=True)
class Consumer:
    """One registered handler and its subscription settings."""

    topic: str
    subscription: str
    handler: MessageHandler
    dlq: str | None = None
    max_redeliveries: int = 3
    retry_delay: float = 1.0
    resilience: str | None = None
    initial_position: Position = "latest"

    @property
    def name(self) -> str:
        """`subscription@topic`, for logs."""
        return f"{self.subscription}@{self.topic}"

    @property
    def dead_letter_topic(self) -> str:
        """The `dlq` topic, else Pulsar's default `<topic>-<subscription>-DLQ`."""
        return self.dlq or f"{self.topic}-{self.subscription}-DLQ"


def _resilient(name: str, handler: MessageHandler) -> MessageHandler:
    try:
        module = importlib.import_module("policyroute.resilience")
    except ModuleNotFoundError as exc:
        raise PolicyrouteError(
            f"consumer resilience profile {name!r} needs policyroute.resilience, "
            "which this installation does not have"
        ) from exc
    wrapped: MessageHandler = module.resilient(name)(handler)
    return wrapped


@dataclass
class Worker:
    """A registry of consumers, and the loop that runs them against one broker."""

    consumers: list[Consumer] = field(default_factory=list)
    receiver_queue_size: int = 100
    _client: Any = field(default=None, init=False, repr=False)
    _subscriptions: list[Any] = field(default_factory=list, init=False, repr=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False, repr=False)
    _busy: int = field(default=0, init=False, repr=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)
    _settled: OrderedDict[Entry, set[int]] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    _settled_count: int = field(default=0, init=False, repr=False)
    _dead_letter_producers: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _dead_letter_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _operation_timeout: float = field(default=10.0, init=False, repr=False)

    def consumer(
        self,
        topic: str,
        *,
        subscription: str,
        dlq: str | None = None,
        max_redeliveries: int = 3,
        retry_delay: str | float = "1s",
        resilience: str | None = None,
        initial_position: Position = "latest",
    ) -> Callable[[H], H]:
        """Register an async handler for `topic` under `subscription`."""
        parse_topic(topic)
        if dlq is not None:
            parse_topic(dlq)
        if not subscription:
            raise ValueError("a consumer needs a non-empty `subscription` name")
        if max_redeliveries < 1:
            raise ValueError(f"max_redeliveries must be at least 1, got {max_redeliveries}")
        if initial_position not in ("latest", "earliest"):
            raise ValueError("initial_position is 'latest' or 'earliest'")
        delay = parse_duration(retry_delay)

        def register(handler: H) -> H:
            registered: H = handler  # returned as given (the check below narrows `handler`)
            if not inspect.iscoroutinefunction(handler):
                raise TypeError(f"consumer handler {handler!r} must be an `async def` function")
            self.consumers.append(
                Consumer(
                    topic,
                    subscription,
                    handler,
                    dlq,
                    max_redeliveries,
                    delay,
                    resilience,
                    initial_position,
                )
            )
            return registered

        return register

    async def start(self, url: str, *, operation_timeout: float = 10.0) -> None:
        """Subscribe every consumer and start receiving."""
        import pulsar

        if not self.consumers:
            raise PolicyrouteError("the worker has no consumers registered")
        handlers = [
            _resilient(c.resilience, c.handler) if c.resilience else c.handler
            for c in self.consumers
        ]
        self._stopping = False
        self._operation_timeout = operation_timeout
        self._dead_letter_lock = asyncio.Lock()  # of this run's event loop
        self._client = async_client(url, operation_timeout=operation_timeout)
        try:
            for spec, handler in zip(self.consumers, handlers, strict=True):
                position = (
                    pulsar.InitialPosition.Earliest
                    if spec.initial_position == "earliest"
                    else pulsar.InitialPosition.Latest
                )
                sub = await self._client.subscribe(
                    spec.topic,
                    spec.subscription,
                    consumer_type=pulsar.ConsumerType.Shared,
                    receiver_queue_size=self.receiver_queue_size,
                    negative_ack_redelivery_delay_ms=int(spec.retry_delay * 1000),
                    initial_position=position,
                    # No dead_letter_policy: the worker dead-letters (per message, not batch).
                )
                self._subscriptions.append(sub)
                self._tasks.append(
                    asyncio.create_task(self._loop(spec, handler, sub), name=spec.name)
                )
        except Exception as exc:
            await self.stop(grace=1.0)
            raise StorageError("pulsar", f"subscribe {spec.name}", False, exc) from exc

    async def stop(self, grace: float = 10.0) -> None:
        """Let running handlers finish (at most `grace` s), then close consumers and client."""
        self._stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self._busy:
                    self._idle.clear()
                    await self._idle.wait()
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.close(), grace)
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._subscriptions.clear()
        self._tasks.clear()
        for producer in self._dead_letter_producers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.close(), grace)
        self._dead_letter_producers.clear()
        self._settled.clear()
        self._settled_count = 0
        if self._client is not None:
            await close_client(self._client, grace)
            self._client = None
            release_clients()

    async def run(self, url: str, stop: asyncio.Event, *, grace: float = 10.0) -> None:
        """Run every consumer until `stop` is set, then stop cleanly."""
        await self.start(url)
        try:
            await stop.wait()
        finally:
            await self.stop(grace)

    async def _loop(self, spec: Consumer, handler: MessageHandler, sub: Any) -> None:
        while not self._stopping:
            try:
                raw = await sub.receive()
            except Exception as exc:
                if self._stopping or result_name(exc) == "AlreadyClosed":
                    return
                log.warning("policyroute: consumer %s: receive failed: %s", spec.name, exc)
                await asyncio.sleep(0.5)
                continue
            self._busy += 1
            try:
                await self._handle(spec, handler, sub, raw)
            finally:
                self._busy -= 1
                self._idle.set()

    async def _handle(self, spec: Consumer, handler: MessageHandler, sub: Any, raw: Any) -> None:
        message = Message.of(raw)
        entry, index = self._entry_of(spec, raw)
        if entry is not None and index in self._settled.get(entry, ()):
            # Its batch came back for another message's sake: handled here already.
            self._settled.move_to_end(entry)
            await self._acknowledge(spec, sub, raw)
            return
        try:
            # A child of the span that published the event (trace context in the properties).
            with consumer_span(spec.topic, spec.subscription, message.properties):
                await handler(message)
        except Exception as exc:
            CONSUMED.labels(spec.subscription, "nack").inc()
            log.warning(
                "policyroute: consumer %s failed on message %s (redelivery %d of %d): %r",
                spec.name,
                message.message_id,
                message.redelivery_count,
                spec.max_redeliveries,
                exc,
            )
            if message.redelivery_count >= spec.max_redeliveries and await self._dead_letter(
                spec, raw, message
            ):
                self._settle(entry, index)
                await self._acknowledge(spec, sub, raw)
                return
            with contextlib.suppress(Exception):
                await sub.negative_acknowledge(raw)
            return
        CONSUMED.labels(spec.subscription, "ack").inc()
        self._settle(entry, index)
        await self._acknowledge(spec, sub, raw)

    @staticmethod
    def _entry_of(spec: Consumer, raw: Any) -> tuple[Entry | None, int]:
        """The batch of a message and its index there; no batch for an unbatched message."""
        mid = raw.message_id()
        index = int(mid.batch_index())
        if index < 0:
            return None, index
        return (spec.name, int(mid.partition()), int(mid.ledger_id()), int(mid.entry_id())), index

    def _settle(self, entry: Entry | None, index: int) -> None:
        """Remember a message of a batch as done, forgetting the oldest batches past the cap."""
        if entry is None:
            return
        done = self._settled.setdefault(entry, set())
        self._settled.move_to_end(entry)
        if index not in done:
            done.add(index)
            self._settled_count += 1
        while self._settled_count > SETTLED_MAX:
            _, forgotten = self._settled.popitem(last=False)
            self._settled_count -= len(forgotten)

    async def _acknowledge(self, spec: Consumer, sub: Any, raw: Any) -> None:
        try:
            await sub.acknowledge(raw)
        except Exception as exc:  # it will be redelivered: handlers must tolerate repeats
            log.warning("policyroute: consumer %s: acknowledge failed: %s", spec.name, exc)

    async def _dead_letter(self, spec: Consumer, raw: Any, message: Message) -> bool:
        """Publish a message that failed its last redelivery to the DLQ; False if that failed."""
        topic = spec.dead_letter_topic
        properties = {
            **message.properties,
            REAL_TOPIC: message.topic,
            ORIGIN_MESSAGE_ID: message.message_id,
        }
        try:
            async with self._dead_letter_lock:  # one producer per topic, whoever asks first
                producer = self._dead_letter_producers.get(topic)
                if producer is None:
                    producer = await self._client.create_producer(
                        topic,
                        send_timeout_millis=int(self._operation_timeout * 1000),
                        batching_enabled=False,
                    )
                    self._dead_letter_producers[topic] = producer
            await producer.send(
                message.data,
                properties=properties,
                partition_key=raw.partition_key() or None,
                ordering_key=raw.ordering_key() or None,
            )
        except Exception as exc:
            log.warning(
                "policyroute: consumer %s cannot move message %s to %s, redelivering it: %s",
                spec.name,
                message.message_id,
                topic,
                exc,
            )
            return False
        log.warning(
            "policyroute: consumer %s moved message %s to %s after %d redeliveries",
            spec.name,
            message.message_id,
            topic,
            message.redelivery_count,
        )
        return True


# The default registry: `@policyroute.consumer` adds here; `policyroute worker MODULE` runs it.
consumers = Worker()
consumer = consumers.consumer
