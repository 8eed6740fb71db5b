"""`retry`, `breaker`, `timeout` and `resilience`: one step around the handler.

Inside the step the breaker is outermost (a retried request is one breaker call), then
the retries, then the time limit of each attempt. To retry, each attempt's response is
buffered and only the last one is sent; the request body is replayed for every attempt.
A 5xx answer or a raised exception is a failure; a 4xx answer is a success and is never
retried. Unsafe methods are retried only when the request carries the route's
idempotency key.
"""

from __future__ import annotations

from starlette.types import Message, Send

from ..asgi.body import DEFAULT_MAX_BODY, read_body, replay
from ..backends.valkey import Store
from ..compile.compiler import Env, register
from ..compile.step import Context, Handler, Step
from ..errors import ConfigError, Denial, Finding, Location, Problems
from ..language.policy import RoutePolicy
from ..resilience.guard import Guard, Spec
from ..resilience.profiles import PROFILES_SERVICE, SAFE_METHODS, Profiles, Registry, effective
from ..resilience.retry import AttemptTimeout, ServerError
from .request import body_limit


class _Buffer:
    """One attempt's response, held back until it is known to be the one to send."""

    __slots__ = ("messages", "status")

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.status = 0

    async def send(self, message: Message) -> None:
        """Keep a message of the response."""
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        self.messages.append(message)

    async def flush(self, send: Send) -> None:
        """Send the kept response."""
        for message in self.messages:
            await send(message)


class _Watch:
    """A pass-through `send` that notes the status (when no retry is possible)."""

    __slots__ = ("send_on", "started", "status")

    def __init__(self, send: Send) -> None:
        self.send_on = send
        self.started = False
        self.status = 0

    async def send(self, message: Message) -> None:
        """Note the status, then pass the message on."""
        if message["type"] == "http.response.start":
            self.started = True
            self.status = int(message["status"])
        await self.send_on(message)




def _timed_out(exc: AttemptTimeout) -> Denial:
    return Denial(Problems.UPSTREAM_TIMEOUT, str(exc).replace("the call", "the handler"))


class ResilienceStep(Step):
    """Breaker, retry and timeout around the handler of one route."""

    name = "resilience"
    guard = False

    def __init__(
        self,
        spec: Spec,
        registry: Registry,
        store: Store | None,
        idempotency_header: str | None,
        body_limit: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.spec = spec
        self.registry = registry
        self.store = store
        self.idempotency_header = idempotency_header
        # A retried request's body is read whole (to send it again): at most this much.
        self.body_limit = body_limit
        self._guard: Guard | None = None

    def describe(self) -> str:
        """Breaker, retry and timeout settings in one line."""
        return self.spec.describe()

    def _retries(self, ctx: Context) -> bool:
        if not self.spec.retries:
            return False
        if ctx.method in SAFE_METHODS:
            return True
        return self.idempotency_header is not None and self.idempotency_header in ctx.headers

    async def around(self, ctx: Context, call_next: Handler) -> None:
        """Run the handler under the route's guard."""
        if ctx.scope["type"] != "http":
            # A websocket is one long exchange: nothing to retry, time out or count.
            await call_next(ctx)
            return
        guard = self._guard
        if guard is None:
            # The breaker belongs to the route ("METHOD /template"), known once a request runs.
            guard = self._guard = self.registry.guard(ctx.route, ctx.route, self.spec, self.store)
        try:
            if self._retries(ctx):
                await self._buffered(ctx, call_next, guard)
            else:
                await self._streamed(ctx, call_next, guard)
        finally:
            if ctx.span is not None and guard.breaker is not None:
                ctx.note("breaker", _breaker_state(guard.breaker))

    async def _buffered(self, ctx: Context, call_next: Handler, guard: Guard) -> None:
        base, send = ctx.receive, ctx.send
        body = await read_body(ctx, self.body_limit)

        async def attempt() -> _Buffer:
            buffer = _Buffer()
            ctx.receive = replay(body, base)
            ctx.send = buffer.send
            await call_next(ctx)
            if buffer.status >= 500:
                raise ServerError(buffer.status, buffer)
            return buffer

        try:
            final = await guard.run(attempt)
        except ServerError as exc:
            final = exc.response  # the last attempt's 5xx is the answer
        except AttemptTimeout as exc:
            raise _timed_out(exc) from exc
        finally:
            ctx.receive, ctx.send = base, send
        await final.flush(send)

    async def _streamed(self, ctx: Context, call_next: Handler, guard: Guard) -> None:
        send = ctx.send
        watch = _Watch(send)
        ctx.send = watch.send

        async def attempt() -> None:
            await call_next(ctx)
            if watch.status >= 500:
                raise ServerError(watch.status)

        try:
            await guard.run(attempt, retry=False)
        except ServerError:
            pass  # already sent as it was produced
        except AttemptTimeout as exc:
            if watch.started:
                raise  # the response is underway: cut it rather than send a second one
            raise _timed_out(exc) from exc
        finally:
            ctx.send = send


def _breaker_state(breaker: object) -> str:
    """closed, half-open or open, as this process last saw it (a span attribute)."""
    state = getattr(breaker, "state", None) or getattr(getattr(breaker, "local", None), "state", "")
    return str(state) or "unknown"


_FALLBACK = Registry()


def _config_error(message: str) -> ConfigError:
    return ConfigError([Finding("invalid-resilience", message, Location("<policy>"))])


def make_resilience(policy: RoutePolicy, env: Env) -> Step | None:
    """The resilience step of a route; None when it sets none of the keys."""
    if (
        policy.retry is None
        and policy.breaker is None
        and policy.timeout is None
        and policy.resilience is None
    ):
        return None
    profiles: Profiles | None = env.services.get(PROFILES_SERVICE)
    known = profiles.profiles if profiles is not None else {}
    found = effective(policy, known)
    if found is None:
        raise _config_error(f"unknown resilience profile {policy.resilience!r}")
    try:
        spec = Spec.build(found.retry, found.breaker, found.timeout, policy.resilience)
    except ValueError as exc:
        raise _config_error(str(exc)) from None
    if spec.empty:
        return None
    if spec.timeout is not None and spec.timeout <= 0:
        raise _config_error("`timeout` must be a positive duration")
    store: Store | None = None
    if spec.breaker is not None and spec.breaker.shared:
        store = env.service("valkey", "a shared circuit breaker")
    header = policy.idempotency.header.lower() if policy.idempotency is not None else None
    registry = profiles.registry if profiles is not None else _FALLBACK
    return ResilienceStep(spec, registry, store, header, body_limit(policy, env))


register(("retry", "breaker", "timeout", "resilience"), make_resilience)

__all__: list[str] = ["ResilienceStep", "make_resilience"]
