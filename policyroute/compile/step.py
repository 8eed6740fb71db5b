"""The per-request context and the step protocol every policy key compiles to."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Final, Protocol

from mypy_extensions import mypyc_attr
from starlette.types import ASGIApp, Receive, Scope, Send

from ..principal import ANONYMOUS, SCOPE_KEY, Principal

# What a span attribute may hold (OpenTelemetry's primitive attribute values).
AttributeValue = str | bool | int | float


class Meter(Protocol):
    """What a step may count: a decision from a fixed vocabulary (see observability.metrics)."""

    def count(self, kind: str, outcome: str) -> None:
        """Count one decision of `kind` (rate_limit, credits, cache, idempotency)."""
        ...

    def shadow(self, step: str, reason: str) -> None:
        """Count a denial a shadowed step did not enforce."""
        ...


class _NoMeter:
    """The meter of a context made outside a bound chain: counts nothing."""

    def count(self, kind: str, outcome: str) -> None:
        """Count nothing."""

    def shadow(self, step: str, reason: str) -> None:
        """Count nothing."""


NO_METER: Final[Meter] = _NoMeter()


class Span(Protocol):
    """The part of an OpenTelemetry span a step writes to."""

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Set one attribute."""
        ...


class Context:
    """What the steps of one request share; built once per request."""

    __slots__ = (
        "_headers",
        "app",
        "authorization",
        "client",
        "denied_by",
        "forwarded",
        "header_bytes",
        "marks_entry",
        "meter",
        "method",
        "principal",
        "raw_id",
        "receive",
        "request_id",
        "root",
        "route",
        "scope",
        "send",
        "shadowed",
        "span",
        "state",
        "status",
    )

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: str,
        app: ASGIApp,
        id_header: bytes = b"x-request-id",
    ) -> None:
        # A dict, as ASGI servers make every scope: the compiled steps then read it with
        # native dict calls (`.get` on a mapping is a method lookup and a call each time).
        # A scope of another mapping type is copied once, here.
        self.scope: dict[str, Any] = scope if isinstance(scope, dict) else dict(scope)
        self.app = app
        self.receive = receive
        self.send = send
        self.route = route
        scope = self.scope
        self.method: str = scope.get("method", "GET")
        self._headers: dict[str, str] | None = None
        client = scope.get("client")
        self.client: str | None = client[0] if client else None
        self.principal: Principal = ANONYMOUS
        self.state: dict[str, Any] = {}
        self.status: int = 0
        scope[SCOPE_KEY] = ANONYMOUS
        # Observability: set by the bound chain; inert for a context made elsewhere.
        self.request_id: str = ""
        self.meter: Meter = NO_METER
        self.span: Span | None = None  # the running step's span, only while a span records
        self.root: Span | None = None  # the request's span, only while a span records
        self.denied_by: str | None = None  # the guard that refused the request
        self.shadowed: str | None = None  # the first denial a shadowed step did not enforce
        # Whether the endpoint marks its entry (`_entry.py`); else it runs whenever called.
        self.marks_entry = False
        # One pass over the headers for what every request's steps read (header names are
        # lower-case in ASGI, as Starlette reads them too): the caller's request id (the
        # first `id_header`), the bytes of all values, every Authorization value, and
        # whether any X-Forwarded-For came.
        raw_id: bytes | None = None
        size = 0
        authorization: list[bytes] = []
        forwarded = False
        for key, value in scope["headers"]:
            size += len(value)
            if key == id_header and raw_id is None:
                raw_id = value
            if key == b"authorization":
                authorization.append(value)
            elif key == b"x-forwarded-for":
                forwarded = True
        self.raw_id = raw_id
        self.header_bytes = size
        self.authorization = authorization
        self.forwarded = forwarded

    @property
    def headers(self) -> dict[str, str]:
        """Request headers, lower-cased names; repeated fields joined with ', ' (RFC 9110)."""
        if self._headers is None:
            out: dict[str, str] = {}
            for raw_name, raw_value in self.scope["headers"]:
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                out[name] = f"{out[name]}, {value}" if name in out else value
            self._headers = out
        return self._headers

    def header_values(self, name: bytes) -> list[bytes]:
        """Every raw value of one header (name lower-case bytes), in order."""
        return [v for k, v in self.scope["headers"] if k.lower() == name]

    def set_principal(self, principal: Principal) -> None:
        """Record the caller for later steps and for the `principal` dependency."""
        self.principal = principal
        self.scope[SCOPE_KEY] = principal

    def note(self, key: str, value: AttributeValue) -> None:
        """Name a decision on the step's span and the request's span (nothing when not tracing).

        `key` is short (`cache`, `credits.charged`); it becomes `policyroute.<key>`. Values
        are decisions from fixed vocabularies or counts: never tokens, codes or user data.
        """
        span = self.span
        if span is not None:
            name = "policyroute." + key
            span.set_attribute(name, value)
            root = self.root
            if root is not None and root is not span:
                root.set_attribute(name, value)

    def decide(self, kind: str, outcome: str) -> None:
        """Count a step's decision on the route's metrics and name it on the spans."""
        self.meter.count(kind, outcome)
        if self.span is not None:
            self.note(kind, outcome)


Handler = Callable[[Context], Awaitable[None]]


async def innermost(ctx: Context) -> None:
    """The end of every chain: the route's own app.

    A step or chain whose `call_next` is this one may await `ctx.app` itself instead: one
    coroutine frame less for the whole handler.
    """
    await ctx.app(ctx.scope, ctx.receive, ctx.send)


# `innermost` as a value, for the per-request `is innermost` checks: a `Final` name is read
# directly when compiled, a function's name from the module's dict each time.
INNERMOST: Final[Handler] = innermost


@mypyc_attr(allow_interpreted_subclasses=True)
class Step:
    """One compiled policy key.

    A guard step overrides `check` (raise `Denial` to refuse), or `check_now` when it can
    decide without awaiting (most can: the chain then makes no coroutine for it). A step
    that needs to act around the handler overrides `around` and calls `call_next(ctx)`
    zero or more times.
    A step whose `enforce` is False is in shadow mode: the chain records its denials
    (metric, log, span) and lets the request on.
    """

    name: ClassVar[str] = "step"
    guard: ClassVar[bool] = True
    # Steps that only compare in-memory values get no span of their own when tracing;
    # their decisions and denials are named on the request's span.
    traced: ClassVar[bool] = True
    enforce: bool = True

    async def check(self, ctx: Context) -> None:
        """Refuse the request by raising `Denial`; return to let it on."""
        pending = self.check_now(ctx)
        if pending is not None:
            await pending

    def check_now(self, ctx: Context) -> Awaitable[None] | None:
        """`check` without a coroutine: None once decided, else an awaitable that finishes it.

        Only called for a step whose class overrides it; such a step leaves `check` alone.
        """
        return None

    async def around(self, ctx: Context, call_next: Handler) -> None:
        """Run code around the rest of the chain."""
        await call_next(ctx)

    def describe(self) -> str:
        """The step's settings in one line, for `policyroute explain`."""
        return ""

    def start(self) -> None:
        """Begin background work on the running loop; the engine calls it at startup."""

    async def stop(self) -> None:
        """End background work; the engine calls it at shutdown."""

    def __repr__(self) -> str:
        detail = self.describe()
        return f"{type(self).__name__}({detail})"
