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
it, so Pulsar redelivers it after `retry_delay`; after `max_redeliveries` redeliveries the
client moves it to the `dlq` topic (Pulsar's dead letter policy; without `dlq`, Pulsar's
default `<topic>-<subscription>-DLQ`). Subscriptions are `Shared`, so several workers split
a topic. `resilience="name"` wraps the handler with the named resilience profile
(`policyroute.resilient`; the profile comes from the installed policies, so the worker
module imports the app that calls `install`). `policyroute worker MODULE[:ATTR]` runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .._types import parse_duration, parse_topic
from ..errors import PolicyrouteError, StorageError
from ..observability.tracing import consumer_span
from ._pulsar import async_client, release_clients, result_name
from .envelope import EVENT_ID
from .metrics import CONSUMED

log = logging.getLogger("policyroute")

Position = Literal["latest", "earliest"]


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
                    dead_letter_policy=pulsar.ConsumerDeadLetterPolicy(
                        spec.max_redeliveries, spec.dlq
                    ),
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
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.close(), grace)
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
            with contextlib.suppress(Exception):
                await sub.negative_acknowledge(raw)
            return
        CONSUMED.labels(spec.subscription, "ack").inc()
        try:
            await sub.acknowledge(raw)
        except Exception as exc:  # it will be redelivered: handlers must tolerate repeats
            log.warning("policyroute: consumer %s: acknowledge failed: %s", spec.name, exc)


# The default registry: `@policyroute.consumer` adds here; `policyroute worker MODULE` runs it.
consumers = Worker()
consumer = consumers.consumer
