"""The "pulsar" service: publishes route events without holding responses.

Path of an event: `emit` puts it on a bounded in-memory queue (never awaits); a pump hands
it to the topic's producer (one client, one producer per topic, created on first use).
When the broker is away, a send times out or a queue is full, the event is appended to
the outbox (a Valkey stream, see `outbox.py`) and a relay publishes it once the broker is
back: at least once, with the same event id. A publication failure that is the event's own
fault (e.g. `MessageTooBig`) counts toward the route's `max_attempts`; after that the event
goes to the route's DLQ topic (a compressing, chunking producer, so an oversized event
still fits).

Memory bounds (`POLICYROUTE_EVENTS_QUEUE_SIZE`): the queue toward the broker, and the queue
toward the outbox, hold at most that many events each. Only when the broker and Valkey are
both down and that second queue is full is an event lost; each loss is logged and counted
as `policyroute_events_total{outcome="failed"}`.

`stop()` (app shutdown) waits up to `events_flush_timeout` for queued and in-flight events
to be published, moves what is left to the outbox within another `events_flush_timeout`,
then closes producers and the client. Events are not lost when the app's shutdown does
not run:
- a stop that comes while every task is being cancelled (a forced quit: uvicorn on a
  second Ctrl+C cancels the app's tasks instead of running its shutdown) saves what the
  cancelled writer left, from its own frame;
- a bus never stopped is stopped as its event loop ends (`asyncio.run` and uvicorn close
  a loop's async generators before the loop: the bus holds one whose `finally` stops it);
- a process that exits with events still in memory and its loop closed some other way
  writes them to the outbox as it exits (`_save_at_exit`: one blocking call, bounded by
  the flush timeout), then closes the native client.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

from ..backends.valkey import Store
from ..config import Settings
from ..crypto import Keyring
from ..errors import StorageError
from ._pulsar import (
    BrokerUnavailable,
    async_client,
    close_client,
    is_transient,
    release_clients,
    result_name,
)
from .envelope import Event
from .metrics import EVENTS, OUTBOX_DEPTH
from .outbox import Outbox, OutboxError
from .relay import Relay

log = logging.getLogger("policyroute")

# A topic whose producer could not be created is not tried again before this many seconds
# (events go straight to the outbox meanwhile).
PRODUCER_RETRY = 1.0
MAX_IN_FLIGHT = 1000
DLQ_PROPERTIES = ("policyroute_origin_topic", "policyroute_error", "policyroute_attempts")


class _Every:
    """Lets a repeated log line through at most once per `seconds`, counting the rest."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = -seconds
        self.skipped = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            return True
        self.skipped += 1
        return False


async def _cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel tasks and wait for them to end."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


class EventBus:
    """Publishes events to Pulsar; falls back to the Valkey outbox; relays it back."""

    def __init__(
        self,
        url: str,
        *,
        store: Store | None,
        keyring: Keyring | None = None,
        config: Settings | None = None,
        offline: bool = False,
    ) -> None:
        cfg = config or Settings()
        self.url = url
        self.offline = offline
        self.store = store
        self.keyring = keyring
        self.outbox = Outbox(store, keyring) if store is not None else None
        self.queue_size = cfg.events_queue_size
        self.send_timeout = cfg.events_send_timeout
        self.flush_timeout = cfg.events_flush_timeout
        self.relay = (
            Relay(
                self,
                self.outbox,
                batch=cfg.outbox_batch,
                poll=cfg.outbox_poll,
                claim_idle=cfg.outbox_claim_idle,
            )
            if self.outbox is not None
            else None
        )
        self.dropped = 0
        self.broker_ok = True
        self._client: Any = None
        self._producers: dict[tuple[str, bool], asyncio.Task[Any]] = {}
        self._retry_at: dict[tuple[str, bool], float] = {}
        self._pending: asyncio.Queue[Event] = asyncio.Queue(maxsize=self.queue_size)
        self._spill: deque[Event] = deque()
        self._in_flight: dict[asyncio.Task[None], Event] = {}
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._writer_wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._relay_task: asyncio.Task[None] | None = None
        self._state = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_end: AsyncGenerator[None, None] | None = None
        self._exit_hook: Callable[[], None] | None = None
        self._saving: list[Event] = []  # the batch the writer is writing now
        self._warn_store = _Every(5.0)
        self._warn_drop = _Every(1.0)

    @property
    def unsaved(self) -> int:
        """Events in memory that the broker did not take and the outbox has not saved yet."""
        return len(self._spill) + len(self._saving)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the pump, the outbox writer and the relay (the client connects lazily)."""
        self._launch()

    def _launch(self) -> None:
        if self._state != "new" or self.offline:
            return
        self._state = "running"
        self._client = async_client(self.url, operation_timeout=self.send_timeout)
        self._pump_task = asyncio.create_task(self._pump(), name="policyroute-events-pump")
        self._writer_task = asyncio.create_task(self._writer(), name="policyroute-events-outbox")
        self._writer_task.add_done_callback(lambda _: self._progress.set())
        self._loop = asyncio.get_running_loop()
        self._loop_end = gen = self._until_loop_ends()
        _first_step(gen)
        self._exit_hook = functools.partial(_save_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)
        if self.relay is not None:
            self._relay_task = asyncio.create_task(self.relay.run(), name="policyroute-relay")

    async def stop(self) -> None:
        """Publish or save every pending event (bounded waits), then close producers."""
        if self._state != "running":
            return
        self._state = "closing"
        await self._wait(lambda: self._pending.empty() and not self._in_flight)
        # The relay stops first: entries saved from here on stay new in the stream, free for
        # the next process's relay (an entry this relay held is claimed after claim_idle).
        # It finishes the batch in hand (bounded), so what it published is acknowledged.
        if self.relay is not None and self._relay_task is not None:
            self.relay.stop()
            await asyncio.wait({self._relay_task}, timeout=self.flush_timeout)
        await _cancel(self._relay_task, self._pump_task)
        while not self._pending.empty():
            self._to_outbox(self._pending.get_nowait())
        in_flight = list(self._in_flight)
        for task in in_flight:
            task.cancel()  # its event goes to the outbox (and may reach the topic: at least once)
        await asyncio.gather(*in_flight, return_exceptions=True)
        writer = self._writer_task
        if self.outbox is not None:
            # Until the overflow is saved: a batch the writer is writing still counts.
            await self._wait(lambda: not self.unsaved or writer is None or writer.done())
        await _cancel(writer)  # a batch cut off mid-write is back in the spill
        if self._spill and self.outbox is not None:
            # The writer was cancelled with every other task (a forced quit) before it
            # could save them: one last bounded try from here.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_timeout):
                    while self._spill and await self._save():
                        pass
        if self._spill:
            lost = len(self._spill)
            for event in self._spill:
                EVENTS.labels(event.route, "failed").inc()
            self.dropped += lost
            self._spill.clear()
            log.error(
                "policyroute: %d event(s) could not be published or saved to the outbox "
                "before shutdown (broker and Valkey unavailable); they are lost",
                lost,
            )
        await self._close_client()
        self._state = "closed"
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)

    async def _until_loop_ends(self) -> AsyncGenerator[None, None]:
        """Held open for the loop's life; the loop's async-generator shutdown stops the bus."""
        try:
            yield
        finally:
            if self._state in ("running", "closing"):
                log.warning(
                    "policyroute: the events service was not stopped before its event loop "
                    "ended (run the app's lifespan); stopping it now"
                )
                await self.stop()

    def _unsaved_events(self) -> list[Event]:
        """Every event in memory that is neither published nor in the outbox (at exit)."""
        found: dict[int, Event] = {}
        queued: list[Event] = list(getattr(self._pending, "_queue", ()))
        sending = [e for task, e in self._in_flight.items() if not task.done()]
        for event in (*self._saving, *self._spill, *queued, *sending):
            found.setdefault(id(event), event)
        return list(found.values())

    def save_now(self) -> int:
        """Write what is still in memory to the outbox with a blocking call; the count saved.

        For a process that exits without `stop()`; bounded by the flush timeout. Events
        that were being sent may also have reached the broker: a duplicate (same id), at
        least once. Raises StorageError when Valkey cannot take them.
        """
        events = self._unsaved_events()
        if not events:
            return 0
        if self.outbox is None:
            raise StorageError("valkey", "events outbox write", False, None)
        self.outbox.add_now(events, timeout=self.flush_timeout)
        self._spill.clear()
        self._saving = []
        with contextlib.suppress(Exception):
            while True:
                self._pending.get_nowait()
        self._in_flight.clear()
        for event in events:
            EVENTS.labels(event.route, "outbox").inc()
        return len(events)

    async def _wait(self, done: Callable[[], bool]) -> None:
        """Wait (at most the flush timeout) until `done()`, checked after each step of work."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.flush_timeout):
                while not done():
                    self._progress.clear()
                    await self._progress.wait()

    async def _close_client(self) -> None:
        await _cancel(*(t for t in self._producers.values() if not t.done()))
        producers = [
            t.result() for t in self._producers.values() if not t.cancelled() and not t.exception()
        ]
        self._producers.clear()
        closing = [asyncio.ensure_future(p.close()) for p in producers]
        if closing:
            _, late = await asyncio.wait(closing, timeout=self.flush_timeout)
            for future in late:
                future.cancel()
            await asyncio.gather(*closing, return_exceptions=True)
        # No native producer may outlive the collection below in this frame: one destroyed
        # at interpreter exit instead aborts the process (see `release_clients`).
        producers.clear()
        closing.clear()
        if self._client is not None:
            await close_client(self._client, self.flush_timeout)
            self._client = None
            release_clients()

    # -- the request path ------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Queue an event for publication; never waits (the outbox takes the overflow)."""
        if self._state == "new":
            log.warning("policyroute: events published before startup; run the app lifespan")
            self._launch()
        if self._state == "closed" or self.offline:
            self._lose(event, "the events service is stopped")
            return
        if self._state == "closing":
            self._to_outbox(event)
            return
        try:
            self._pending.put_nowait(event)
        except asyncio.QueueFull:
            self._to_outbox(event)

    # -- publication -----------------------------------------------------------------

    async def publish(self, event: Event, *, dlq: bool = False) -> None:
        """Send one event to its topic (or its DLQ topic); raise on failure."""
        topic = event.dlq if dlq else event.topic
        if topic is None:
            raise ValueError(f"{event.route}: no DLQ topic")
        producer = await self._producer(topic, chunked=dlq)
        properties = event.message_properties()
        if dlq:
            values = (event.topic, event.error, str(event.attempts))
            properties.update(zip(DLQ_PROPERTIES, values, strict=True))
        try:
            await producer.send(event.payload, properties=properties)
        except Exception as exc:
            if is_transient(exc):
                self.broker_ok = False
            raise
        self.broker_ok = True

    async def _producer(self, topic: str, *, chunked: bool) -> Any:
        key = (topic, chunked)
        task = self._producers.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            if time.monotonic() < self._retry_at.get(key, 0.0):
                raise BrokerUnavailable(f"no producer for {topic} yet")
            task = asyncio.create_task(self._create(topic, chunked))
            self._producers[key] = task
        producer = await asyncio.shield(task)
        if not producer.is_connected():
            self.broker_ok = False
            raise BrokerUnavailable(f"producer for {topic} is not connected")
        return producer

    async def _create(self, topic: str, chunked: bool) -> Any:
        import pulsar

        try:
            # Batching for throughput on route topics. DLQ topics get LZ4 compression and
            # chunking (which excludes batching), so an event too large for its own topic
            # (MessageTooBig) still reaches the DLQ.
            return await self._client.create_producer(
                topic,
                send_timeout_millis=int(self.send_timeout * 1000),
                block_if_queue_full=False,
                max_pending_messages=MAX_IN_FLIGHT,
                batching_enabled=not chunked,
                batching_max_publish_delay_ms=5,
                chunking_enabled=chunked,
                compression_type=(
                    pulsar.CompressionType.LZ4 if chunked else pulsar.CompressionType.NONE
                ),
            )
        except Exception:
            self._retry_at[(topic, chunked)] = time.monotonic() + PRODUCER_RETRY
            self.broker_ok = False
            raise

    async def _pump(self) -> None:
        while True:
            event = await self._pending.get()
            await self._slots.acquire()
            task = asyncio.create_task(self._send(event))
            self._in_flight[task] = event
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._slots.release()
        self._progress.set()

    async def _send(self, event: Event) -> None:
        try:
            await self.publish(event)
        except asyncio.CancelledError:
            self._to_outbox(event)
            raise
        except Exception as exc:
            if not is_transient(exc):
                event.attempts += 1
                event.error = result_name(exc)
            self._to_outbox(event)
        else:
            EVENTS.labels(event.route, "published").inc()

    # -- the outbox ------------------------------------------------------------------

    def _to_outbox(self, event: Event) -> None:
        if len(self._spill) >= self.queue_size:
            self._lose(event, "the broker and the outbox are unavailable and memory is full")
            return
        self._spill.append(event)
        self._writer_wake.set()

    def _lose(self, event: Event, why: str) -> None:
        self.dropped += 1
        EVENTS.labels(event.route, "failed").inc()
        if self._warn_drop.ready():
            log.error("policyroute: event %s of %s lost: %s", event.id, event.route, why)

    async def _writer(self) -> None:
        delay = 0.05
        while True:
            if not self._spill:
                self._writer_wake.clear()
                await self._writer_wake.wait()
                continue
            saved = await self._save()
            self._progress.set()
            if saved:
                delay = 0.05
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _save(self) -> bool:
        """Write one batch of the in-memory overflow to the outbox; False when Valkey failed."""
        size = self.relay.batch if self.relay is not None else 100
        batch = [self._spill.popleft() for _ in range(min(size, len(self._spill)))]
        self._saving = batch
        try:
            if self.outbox is None:
                raise StorageError("valkey", "events outbox write", False, None)
            depth = await self.outbox.add(batch)
        except asyncio.CancelledError:
            # Stopped mid-write: the batch may or may not be in the stream; keeping it in
            # memory errs toward a duplicate (same id), never a loss.
            self._spill.extendleft(reversed(batch))
            raise
        except OutboxError as exc:
            for event in batch:
                self._lose(event, str(exc))
            return True
        except StorageError as exc:
            self._spill.extendleft(reversed(batch))
            self._back_to_broker()
            if self._warn_store.ready():
                log.error(
                    "policyroute: cannot save %d event(s) to the outbox, keeping them in "
                    "memory and retrying: %s",
                    len(self._spill),
                    exc,
                )
            return False
        finally:
            self._saving = []
        OUTBOX_DEPTH.set(depth)
        for event in batch:
            EVENTS.labels(event.route, "outbox").inc()
        if self.relay is not None:
            self.relay.wake()
        return True

    def _back_to_broker(self) -> None:
        """With Valkey down and the broker up, queued overflow goes back to the broker."""
        if not self.broker_ok or self._state != "running":
            return
        kept: deque[Event] = deque()
        while self._spill and not self._pending.full():
            event = self._spill.popleft()
            if event.attempts >= event.max_attempts:
                kept.append(event)
            else:
                self._pending.put_nowait(event)
        self._spill.extendleft(reversed(kept))

    def describe(self) -> str:
        """The broker and outbox, for explain."""
        where = self.outbox.key if self.outbox is not None else "no outbox"
        return f"pulsar {self.url}, outbox {where}"


def _first_step(gen: AsyncGenerator[None, None]) -> None:
    """Run an async generator to its first `yield` now (registering it with the running loop)."""
    step = gen.__anext__()
    with contextlib.suppress(StopIteration):
        step.send(None)


def _save_at_exit(ref: weakref.ref[EventBus]) -> None:
    """At interpreter exit: the events a bus that was never stopped still holds go to the outbox."""
    bus = ref()
    if bus is None or bus._state == "closed":
        return
    try:
        _close_at_exit(bus)
        saved = bus.save_now()
    except Exception as exc:
        lost = len(bus._unsaved_events())
        bus.dropped += lost
        log.error(
            "policyroute: %d event(s) could not be saved to the outbox at exit (the app's "
            "shutdown did not run); they are lost: %s",
            lost,
            exc,
        )
        return
    if saved:
        log.warning(
            "policyroute: saved %d event(s) to the outbox at exit (the app's shutdown did not "
            "run); the relay publishes them",
            saved,
        )


def _close_at_exit(bus: EventBus) -> None:
    """Close the native client of a bus whose loop is gone, before the interpreter ends.

    Its pending operations then end, and their completions (scheduled on the bus's closed
    loop) are dropped instead of raising in a native thread, which aborts the process.
    """
    loop = getattr(bus, "_loop", None)
    if loop is not None and loop.is_closed():
        with contextlib.suppress(AttributeError, TypeError):  # uvloop's loop takes no attribute
            loop.call_soon_threadsafe = lambda *args, **kwargs: None
    native = getattr(bus._client, "_client", None)
    close = getattr(native, "close", None)
    bus._client = None
    if callable(close):
        with contextlib.suppress(Exception):
            close()
    release_clients()
