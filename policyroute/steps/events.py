"""`events`: after a 2xx, publish an event to the route's Pulsar topic without holding the response.

The step sits inside the stateful step, so an idempotent replay or a cache hit never
reaches it (no second event), and outside resilience, so a retried handler publishes once.
It reads the request body only when request fields are chosen, records the response body
only when response fields are chosen (JSON bodies only), and hands the event to the
"pulsar" service once the response has been sent completely.
"""

from __future__ import annotations

from typing import Protocol

from starlette.types import Message, Send

from ..asgi.body import is_json, read_body_upto
from ..compile.compiler import Env, register
from ..compile.step import Context, Handler, Step
from ..errors import Denial, Problems
from ..events.envelope import Event, TooDeep, envelope, new_event_id, parse_json, pick
from ..language.policy import Events, RoutePolicy

# A request id longer than this is not an id; it is replaced by a generated one.
MAX_REQUEST_ID = 200
# `ctx.state[EVENT_PROPERTIES]`: string properties another step (e.g. tracing) adds to the
# request's event message.
EVENT_PROPERTIES = "event_properties"


class Publisher(Protocol):
    """What the step needs of the events service."""

    def emit(self, event: Event) -> None:
        """Queue an event for publication without waiting."""
        ...


class _Response:
    """What the step records of the response: status, completion, JSON body if wanted."""

    __slots__ = ("body", "done", "json", "keep", "limit", "status")

    def __init__(self, keep: bool, limit: int) -> None:
        self.keep = keep
        self.limit = limit
        self.status = 0
        self.done = False
        self.json = False
        self.body = bytearray()

    def wrap(self, send: Send) -> Send:
        async def record(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                self.status = int(message["status"])
                self.json = self.keep and is_json(message.get("headers", []))
            elif kind == "http.response.body":
                if self.json:
                    self.body.extend(message.get("body", b""))
                    if len(self.body) > self.limit:
                        self.json = False
                        self.body = bytearray()
                if not message.get("more_body", False):
                    await send(message)
                    self.done = True
                    return
            await send(message)

        return record


class EventsStep(Step):
    """Publish the route's event after a 2xx that completed."""

    name = "events"
    guard = False

    def __init__(
        self,
        bus: Publisher,
        events: Events,
        *,
        sensitive: bool,
        request_id_header: str,
        max_body: int,
    ) -> None:
        self.bus = bus
        self.events = events
        self.topic = events.topic
        self.dlq = events.dlq
        self.max_attempts = events.max_attempts
        self.request_fields = tuple(events.fields.request)
        self.response_fields = tuple(events.fields.response)
        self.sensitive = sensitive
        self.request_id_header = request_id_header.lower()
        self.max_body = max_body

    def describe(self) -> str:
        """Topic, DLQ, chosen fields and outbox sealing, in one line."""
        parts = [f"topic={self.topic}"]
        if self.dlq:
            parts.append(f"dlq={self.dlq}")
        parts.append(f"max_attempts={self.max_attempts}")
        if self.request_fields:
            parts.append(f"request fields [{', '.join(self.request_fields)}]")
        if self.response_fields:
            parts.append(f"response fields [{', '.join(self.response_fields)}]")
        if self.sensitive:
            parts.append("outbox sealed")
        return ", ".join(parts)

    async def around(self, ctx: Context, call_next: Handler) -> None:
        """Run the rest of the chain; after a complete 2xx, queue the event."""
        if ctx.method == "HEAD":  # HEAD follows GET's policy but produces nothing to tell
            await call_next(ctx)
            return
        request = await self._request_fields(ctx) if self.request_fields else {}
        response = _Response(bool(self.response_fields), self.max_body)
        original = ctx.send
        ctx.send = response.wrap(original)
        try:
            await call_next(ctx)
        finally:
            ctx.send = original
        if not response.done or not 200 <= response.status < 300:
            return
        chosen = {}
        if response.json:
            try:
                chosen = pick(parse_json(bytes(response.body)), self.response_fields)
            except TooDeep:
                chosen = {}  # the response has gone: its event goes without these fields
        self.bus.emit(self._event(ctx, response.status, request, chosen))

    async def _request_fields(self, ctx: Context) -> dict[str, object]:
        # A larger body is not read (past max_body it streams on to the handler): no fields.
        body = await read_body_upto(ctx, self.max_body)
        if body is None:
            return {}
        try:
            return pick(parse_json(body), self.request_fields)
        except TooDeep as exc:
            raise Denial(
                Problems.INVALID_BODY, f"the request body is not JSON this route can read: {exc}"
            ) from None

    def _event(
        self, ctx: Context, status: int, request: dict[str, object], response: dict[str, object]
    ) -> Event:
        event_id = new_event_id()
        # The chain's id (the caller's when sane, else made), as in logs, spans and the header.
        request_id = ctx.request_id or ctx.headers.get(self.request_id_header, "")
        if not request_id or len(request_id) > MAX_REQUEST_ID:
            request_id = new_event_id()
        payload = envelope(
            event_id=event_id,
            route=ctx.route,
            subject=ctx.principal.subject,
            request_id=request_id,
            status=status,
            request=request,
            response=response,
        )
        return Event(
            id=event_id,
            route=ctx.route,
            topic=self.topic,
            payload=payload,
            dlq=self.dlq,
            max_attempts=self.max_attempts,
            sensitive=self.sensitive,
            properties=dict(ctx.state.get(EVENT_PROPERTIES, {})),
        )


def make_events(policy: RoutePolicy, env: Env) -> Step | None:
    """The events step of a route; None when the route sets no `events`."""
    if policy.events is None:
        return None
    bus: Publisher = env.service("pulsar", "events")
    env.service("valkey", "events (the outbox keeps events while the broker is away)")
    if policy.sensitive:
        env.service(
            "keyring",
            "`sensitive: true` with `events` (outbox entries are sealed; "
            "set POLICYROUTE_DATA_KEYS)",
        )
    return EventsStep(
        bus,
        policy.events,
        sensitive=policy.sensitive,
        request_id_header=env.config.request_id_header,
        max_body=env.config.events_max_body,
    )


register(("events",), make_events)
