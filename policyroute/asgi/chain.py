"""A route's compiled chain, bound: built once (`compile.chain.Chain`), folded once, run
per request.

Binding a chain also binds its observability: the route's metric label children, the
shadow-mode wrappers of guards that do not enforce, and a second fold whose steps open
spans. Per request the only telemetry decision is `tracing.active()`: with no
OpenTelemetry SDK configured the untraced fold runs and no span or attribute is built.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

from mypy_extensions import mypyc_attr
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Receive, Scope, Send

from ..compile.chain import Chain
from ..compile.step import INNERMOST, Context, Handler, Step, innermost
from ..errors import Denial, Problems
from ..language.policy import RoutePolicy
from ..observability.metrics import STEP_OF_PROBLEM, RouteMeter
from ..observability.requests import CURRENT, Current, RequestIds
from ..observability.shadow import shadow_denial
from ..observability.tracing import PREFIX, active, extract, fail, inject
from ._problem import send_problem

ACCESS: Final = logging.getLogger("policyroute.access")
# `ctx.state` key the events step copies into the message properties (steps/events.py).
EVENT_PROPERTIES = "event_properties"
DEFAULT_IDS: Final = RequestIds()
# Module attributes and functions the per-request code reads, bound once: the compiled
# build reads a `Final` name directly, any other global from the module's dict each time.
_perf_counter: Final = time.perf_counter


def _child(tracer: Tracer, name: str) -> Any:
    """A child span of the current one; exceptions are named by type only (see `fail`)."""
    return tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False)


_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})


def _propagated(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether the request carries trace context (parsing it costs; most do not)."""
    return any(name in _TRACE_HEADERS for name, _ in headers)


def _fold(steps: Sequence[Step], traced: bool = False) -> Handler:
    handler: Handler = innermost
    for step in reversed(steps):
        handler = _wrap_traced(step, handler) if traced and step.traced else _wrap(step, handler)
    return handler


def _wrap(step: Step, call_next: Handler) -> Handler:
    # A partial, not a wrapping coroutine: one frame less on every await of the request.
    return functools.partial(step.around, call_next=call_next)


def _wrap_traced(step: Step, call_next: Handler) -> Handler:
    """`_wrap` with a child span for the step (the request's span is its parent)."""
    around = step.around
    name = PREFIX + step.name
    events = step.name == "events"

    async def run(ctx: Context) -> None:
        tracer = active()
        if tracer is None or ctx.root is None:
            await around(ctx, call_next)
            return
        outer = ctx.span
        with _child(tracer, name) as span:
            ctx.span = span
            if events:
                # The event carries this span's context to its consumers.
                inject(ctx.state.setdefault(EVENT_PROPERTIES, {}))
            try:
                await around(ctx, call_next)
            except Denial as denial:
                span.set_attribute("policyroute.denied", denial.problem.slug)
                raise
            except BaseException as exc:
                fail(span, exc)
                raise
            finally:
                ctx.span = outer

    return run


class _Pending:
    """A guard's span-to-be: attributes gathered while it runs, made a span only if any."""

    __slots__ = ("attributes", "error", "started")

    def __init__(self, started: int) -> None:
        self.started = started
        self.attributes: dict[str, Any] = {}
        self.error: BaseException | None = None

    def set_attribute(self, key: str, value: Any) -> None:
        """Keep an attribute for the span."""
        self.attributes[key] = value

    def emit(self, tracer: Tracer, name: str) -> None:
        """The span, as a child of the current (request) span, started when the guard did."""
        span = tracer.start_span(name, start_time=self.started, attributes=self.attributes)
        if self.error is not None:
            fail(span, self.error)
        span.end()


def _shadowed(step: Step) -> Handler:
    """A guard that records its denials instead of raising them (`enforce: false`)."""
    check, name = step.check, step.name

    async def run(ctx: Context) -> None:
        try:
            await check(ctx)
        except Denial as denial:
            shadow_denial(ctx, name, denial)

    return run


def _kinds(steps: Sequence[Step]) -> frozenset[str]:
    """Names of the steps (and fused parts) a route runs: which decisions it can count."""
    names = {s.name for s in steps}
    for step in steps:
        names.update(p.name for p in getattr(step, "parts", ()))
    return frozenset(names)


_SHOWN_NAME = 64  # a longer header name is not repeated in the answer


def oversized(headers: Sequence[tuple[bytes, bytes]], limit: int) -> Denial | None:
    """431 when a header field's value is over `limit` bytes, its repeated fields joined."""
    # Steps read a header repeated on several lines as one value joined with ", " (RFC 9110),
    # so that joined value is what the limit applies to. Only values count, not names.
    sizes: dict[bytes, int] = {}
    for name, value in headers:
        key = name.lower()
        sizes[key] = sizes.get(key, -2) + 2 + len(value)
    for key, size in sizes.items():
        if size > limit:
            named = f"the {key.decode('latin-1')} header" if len(key) <= _SHOWN_NAME else "a header"
            return Denial(
                Problems.HEADER_TOO_LARGE,
                f"{named} is {size} bytes; this server reads header values of at most "
                f"{limit} bytes",
                extra={"limit": limit},
            )
    return None


@mypyc_attr(allow_interpreted_subclasses=True)
class BoundChain:
    """Guards in order, then the around-steps folded over the route's own app."""

    __slots__ = ("chain", "guards", "handler", "header_limit", "ids", "meter", "traced_handler")

    def __init__(
        self,
        chain: Chain,
        ids: RequestIds | None = None,
        policy: RoutePolicy | None = None,
        header_limit: int = 0,
    ) -> None:
        self.chain = chain
        self.ids = ids or DEFAULT_IDS
        # Largest header field value the steps may read (0: no limit); see `oversized`.
        self.header_limit = header_limit
        enforced = policy.enforce if policy is not None else True
        self.guards = tuple(
            (
                s.name,
                s.check if enforced and s.enforce else _shadowed(s),
                s.traced,
                # Decided without a coroutine when the step can (its class has check_now).
                s.check_now
                if enforced and s.enforce and type(s).check_now is not Step.check_now
                else None,
            )
            for s in chain.steps
            if s.guard
        )
        arounds = [s for s in chain.steps if not s.guard]
        self.handler = _fold(arounds)
        self.traced_handler = _fold(arounds, traced=True)
        self.meter = RouteMeter(chain.route, _kinds(chain.steps))

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, marks_entry: bool = False
    ) -> None:
        """Run the chain for one request, then (if allowed) `app`."""
        # `marks_entry`: the endpoint marks when it is called (a FastAPI route, which may
        # refuse a request without calling it), so the steps learn whether it ran.
        if scope["type"] != "http":
            await self._socket(scope, receive, send, app)
            return
        started = _perf_counter()
        ctx = Context(scope, receive, send, self.chain.route, app, self.ids.header)
        ctx.marks_entry = marks_entry
        headers = scope["headers"]
        limit = self.header_limit
        # The values of all fields together (with room for the joins) bound any one of them.
        big = limit and ctx.header_bytes + 2 * len(headers) > limit
        too_large = oversized(headers, limit) if big else None
        if too_large is None:
            ctx.request_id = request_id = self.ids.accept(ctx.raw_id)
        else:
            ctx.request_id = request_id = self.ids.accept(None)
            headers = ()  # nothing reads the headers of a refused request, logs included
        sent = [0]  # the response status, once started
        ctx.send = out = self.ids.echo(send, request_id, sent)
        ctx.meter = self.meter
        token = CURRENT.set(Current(request_id, headers))
        reason: str | None = None
        outcome = "error"
        try:
            if too_large is not None:
                ctx.denied_by = "gate"
                reason = await self._deny(ctx, out, too_large)
            elif (tracer := active()) is None:
                refused: Denial | None = None
                try:  # `_run`, inline: one coroutine fewer a request
                    await self._guarded(ctx)
                except Denial as denial:
                    refused = denial  # answered below: nothing is awaited in a handler
                if refused is not None:
                    reason = await self._deny(ctx, out, refused)
                    refused = None  # no cycle through this frame
            else:
                reason = await self._traced(ctx, out, tracer, sent)
            outcome = "allowed" if reason is None else "denied"
        finally:
            elapsed = _perf_counter() - started
            status = ctx.status = sent[0] or (500 if outcome == "error" else 0)
            self.meter.done(ctx.method, outcome, status, elapsed)
            if ACCESS.isEnabledFor(logging.INFO):
                self._access(ctx, outcome, status, elapsed, reason)
            CURRENT.reset(token)

    async def _run(self, ctx: Context, out: Send, tracer: Tracer | None = None) -> str | None:
        """Guards, then the handler (each in a span with `tracer`); the denial's problem
        type when refused."""
        refused: Denial | None = None
        try:
            if tracer is None:
                await self._guarded(ctx)
            else:
                await self._guarded_traced(ctx, tracer)
        except Denial as denial:
            refused = denial
        if refused is None:
            return None
        answer = self._deny(ctx, out, refused)
        refused = None  # no cycle through this frame
        return await answer

    async def _guarded(self, ctx: Context) -> None:
        """The guards in order (a refusal names its guard on `ctx`), then the handler."""
        for name, check, _, now in self.guards:
            try:
                if now is None:
                    await check(ctx)
                else:
                    pending = now(ctx)
                    if pending is not None:
                        await pending
            except Denial:
                ctx.denied_by = name
                raise
        handler = self.handler
        if handler is INNERMOST:  # no step wraps the route: its app, with no frame between
            await ctx.app(ctx.scope, ctx.receive, ctx.send)
        else:
            await handler(ctx)

    async def _traced(self, ctx: Context, out: Send, tracer: Tracer, sent: list[int]) -> str | None:
        """`_run` inside the request's span, each guard or step that works in a child span."""
        current = trace.get_current_span().get_span_context().is_valid
        # The first span of this service continues the caller's trace, if it sent one.
        parent = None if current or not _propagated(ctx.scope["headers"]) else extract(ctx.headers)
        route = self.chain.route
        attributes = {
            "http.request.method": ctx.method,
            "http.route": route.partition(" ")[2],
            "policyroute.route": route,
            "policyroute.request_id": ctx.request_id,
        }
        with tracer.start_as_current_span(
            route,
            context=parent,
            kind=SpanKind.INTERNAL if current else SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            if not span.is_recording():
                return await self._run(ctx, out)
            ctx.root = ctx.span = span
            try:
                reason = await self._run(ctx, out, tracer)
            except BaseException as exc:
                fail(span, exc)
                raise
            finally:
                ctx.root = ctx.span = None  # the span ends here: later notes go nowhere
                if sent[0]:
                    span.set_attribute("http.response.status_code", sent[0])
                    if sent[0] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("policyroute.allowed", reason is None)
            if reason is not None:
                span.set_attribute("policyroute.denial.reason", reason)
                span.set_attribute("policyroute.denial.step", ctx.denied_by or "chain")
            return reason

    async def _guarded_traced(self, ctx: Context, tracer: Tracer) -> None:
        """`_guarded`, each guard that did work in a child span of the request's."""
        root = ctx.root
        for name, check, traced, _ in self.guards:
            if not traced:
                try:
                    await check(ctx)
                except Denial:
                    ctx.denied_by = name
                    raise
                continue
            # A guard's span is made only if it did work: it named a decision (e.g. a
            # token verified, not a cached one), refused, or failed.
            pending = _Pending(time.time_ns())
            ctx.span = pending
            try:
                await check(ctx)
            except Denial as denial:
                ctx.denied_by = name
                pending.attributes["policyroute.denied"] = denial.problem.slug
                raise
            except BaseException as exc:
                pending.error = exc
                raise
            finally:
                ctx.span = root
                if pending.attributes or pending.error is not None:
                    pending.emit(tracer, PREFIX + name)
        await self.traced_handler(ctx)

    async def _deny(self, ctx: Context, out: Send, denial: Denial) -> str:
        """Count the denial and answer it as problem+json."""
        reason = denial.problem.slug
        step = ctx.denied_by or STEP_OF_PROBLEM.get(reason, "chain")
        ctx.denied_by = step
        self.meter.denied(step, reason)
        scope = ctx.scope
        await send_problem(out, denial, instance=scope.get("path"), head=scope["method"] == "HEAD")
        return reason

    async def _socket(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        """A websocket: the guards and steps, and a policy close (1008) when refused."""
        ctx = Context(scope, receive, send, self.chain.route, app, self.ids.header)
        ctx.meter = self.meter
        limit = self.header_limit
        try:
            if limit:
                too_large = oversized(scope["headers"], limit)
                if too_large is not None:
                    ctx.denied_by = "gate"
                    raise too_large
            await self._guarded(ctx)
            return
        except Denial as denial:
            slug = denial.problem.slug
        self.meter.denied(ctx.denied_by or STEP_OF_PROBLEM.get(slug, "chain"), slug)
        await send({"type": "websocket.close", "code": 1008, "reason": slug})

    def _access(
        self, ctx: Context, outcome: str, status: int, seconds: float, reason: str | None
    ) -> None:
        """One INFO line per request on `policyroute.access`."""
        ms = round(seconds * 1000, 3)
        ACCESS.info(
            "%s %s %d %s %.1fms",
            ctx.method,
            self.chain.route.partition(" ")[2],
            status,
            outcome if reason is None else f"denied ({reason})",
            ms,
            extra={
                "route": self.chain.route,
                "method": ctx.method,
                "status": status,
                "outcome": outcome,
                "reason": reason,
                "step": ctx.denied_by if reason is not None else None,
                "shadow": ctx.shadowed,
                "duration_ms": ms,
            },
        )
