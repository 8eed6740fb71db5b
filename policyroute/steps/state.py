"""The fused stateful step: every stateful pre-check of a request in one Valkey round trip.

`rate_limit`, `credits`, `idempotency` and `cache` each compile to their own part
(`RateLimitStep`, `CreditsStep`, `IdempotencyStep`, `CacheStep`). The compiler folds the
parts of a route into one `StateStep`, which evaluates `lua/state.lua` once before the
handler and `lua/finish.lua` once after it. The parts know only the protocol in
`steps/parts.py`; this module composes them.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import anyio
from starlette.types import Message, Receive, Send

from .._ids import IDS
from ..asgi._entry import ENTERED
from ..asgi.body import BODY_REFUSED, DEFAULT_MAX_BODY, Header, read_body, upstream_of
from ..backends.valkey import ValkeyStore
from ..compile.compiler import Env, register
from ..compile.step import INNERMOST, Context, Handler, Step
from ..errors import Denial, Problems, StorageError
from ..language.policy import RoutePolicy
from ..observability.metrics import backend_error
from ..observability.repeats import backend_warning
from .cache import make_cache_part
from .credits import make_credits_part
from .idempotency import make_idempotency_part
from .parts import PAUSES, PLAIN, PROBES, ClientGone, Outcome, Part, Request, Stored, Vault
from .rate_limit import make_rate_limit_part
from .request import body_limit
from .slots import reply_text, run_finish, run_state, state_reply

# Requests that went on without a policy backend (a step configured `on_backend_error: open`).
BACKEND_FAILED_OPEN: Counter[str] = Counter()

# The reply of a request whose parts asked Valkey nothing but shadow probes.
NOTHING_ASKED = ["go", [], [], []]


FINISHED: Final = "finished"  # req.data: the after-handler ops ran (once, early or at the end)


class StateStep(Step):
    """rate_limit -> credits -> idempotency -> cache, fused into one Valkey round trip."""

    name = "state"
    guard = False

    def __init__(
        self, store: ValkeyStore, parts: Sequence[Part], body_limit: int = DEFAULT_MAX_BODY
    ) -> None:
        # The concrete store, not the `Store` protocol: its methods are then called natively
        # when compiled (a protocol's through Python, keyword arguments parsed each call).
        self.store = store
        self.parts = tuple(parts)
        self.body_limit = body_limit
        # Only a cluster splits a request's ops by hash tag (`slots.py`): only there are
        # they marked.
        self.marked = store.cluster
        for part in self.parts:
            part.body_limit = body_limit
        # Closed wins: a request goes on without the backend only when every part allows it.
        self.fail_open = all(p.fail_open for p in self.parts)
        self.names = ",".join(p.name for p in self.parts)
        self.finish_op = f"{self.names} finish"
        self.peekers = tuple(p for p in self.parts if type(p).peek is not Part.peek)
        self.watch = any(p.watch_disconnect for p in self.parts)
        self.hear = any(p.hears_disconnect for p in self.parts)
        self.keepers = tuple(
            p for p in self.parts if p.may_keep and type(p).keeps is not Part.keeps
        )
        self._failed: tuple[str, Callable[[StorageError], None]] | None = None
        # Chosen once: the parts each phase calls, in order, those with nothing to do left
        # out (called as parts, natively when compiled, not as bound methods).
        self.settlers = tuple(p for p in self.parts if type(p).settle is not Part.settle)
        self.finishers = tuple(p for p in self.parts if type(p).after is not Part.after)

    def _on_error(self, route: str) -> Callable[[StorageError], None]:
        """`_finish_failed` for the route, made once (a step serves one route and its HEAD)."""
        made = self._failed
        if made is None or made[0] != route:
            made = self._failed = (route, functools.partial(_finish_failed, route))
        return made[1]

    def describe(self) -> str:
        """One line for explain: the parts in evaluation order."""
        inner = "; ".join(f"{p.name}({p.describe()})" for p in self.parts)
        return f"one Valkey round trip: {inner}"

    async def stop(self) -> None:
        """End the parts' background work (credits renewing holds)."""
        for part in self.parts:
            await part.stop()

    async def around(self, ctx: Context, call_next: Handler) -> None:
        """Run the fused pre-checks, answer or deny, else run the handler and finish."""
        req = Request(ctx, IDS.next(), self.marked)
        for part in self.peekers:
            part.peek(req)
        for part in self.parts:
            if part.needs_io:
                await part.prepare_io(req)
            else:
                part.prepare(req)
        probes = req.data.get(PROBES)
        if not req.args and not probes:
            # Nothing to ask Valkey: an in-process cache hit, or an optional key not sent.
            if "answer" in req.data:
                await self._local(req)
            else:
                await call_next(ctx)
            return
        failed: StorageError | None = None
        try:
            if probes:
                reply = await self._with_probes(req, probes)
            else:
                reply = state_reply(await run_state(self.store, req, self.names, self.fail_open))
        except StorageError as exc:
            failed = exc  # handled below: nothing is awaited in a handler (`_compiled.py`)
        if failed is not None:
            going = self._without_backend(ctx, call_next, failed)
            failed = None  # no cycle through this frame
            await going
            return
        req.data["verdict"] = reply_text(reply[0])
        outcome = Outcome()
        try:
            for part in self.settlers:
                part.settle(req, reply)
            for pause in req.data.get(PAUSES, ()):
                await pause()
            stored: Stored | None = req.data.get("answer")
            if stored is None:
                wait = req.data.get("wait")
                if wait is not None:
                    stored = await self._waited(req, wait)
            if stored is not None:
                await self._answer(req, stored, outcome)
            else:
                # The handler, in this frame (no coroutine of its own on every request).
                marks = ctx.marks_entry
                original = ctx.send
                received = ctx.receive
                if self.hear:
                    ctx.receive = _Hearing(received, outcome)
                # A request that owns an idempotency record stores it before the client sees
                # the end of the response, so a retry sent right after the response is a
                # replay, not a 409 for a request still "in flight".
                ctx.send = _recording(
                    original,
                    outcome,
                    req.extra,
                    keep=self._keep(req) if self.keepers else None,
                    before_last=(
                        (lambda: self._finish(req, outcome)) if req.data.get("id_owner") else None
                    ),
                )
                # A FastAPI endpoint marks `outcome` when it is called: validation may refuse
                # the request (422, 400) inside the route without calling it. Any other runs
                # when called.
                entered = ENTERED.set(outcome) if marks else None
                if entered is None:
                    outcome.handler_ran = True
                try:
                    if self.watch and _buffered(ctx):
                        await self._watched(ctx, call_next, outcome)
                    elif call_next is INNERMOST:
                        await ctx.app(ctx.scope, ctx.receive, ctx.send)
                    else:
                        await call_next(ctx)
                    if outcome.status == WEBSOCKET_ACCEPTED and ctx.scope["type"] == "websocket":
                        outcome.done = True  # the session ran to its end: it is charged
                finally:
                    ctx.send = original
                    ctx.receive = received
                    if entered is not None:
                        ENTERED.reset(entered)
        except Denial as denial:
            if not outcome.started:
                outcome.status = denial.status
                outcome.error = denial
                denial.headers.update({k.decode(): v.decode() for k, v in req.extra})
            error: BaseException | None = denial
        except BaseException as exc:
            outcome.error = error = exc
        else:
            error = None
        # What `finally` would do, after the handlers: nothing is awaited while an exception
        # is being handled (`_compiled.py`). Runs on every way out, cancellation included.
        pending = self._finish_now(req, outcome)
        if pending is not None:
            await pending
        if error is not None:
            try:
                raise error
            finally:
                error = None  # no cycle through this frame

    async def _with_probes(self, req: Request, probes: list[Callable[[], Awaitable[None]]]) -> Any:
        """The script's reply, with the shadow probes sent in the same write (pipelined)."""
        calls: list[Awaitable[Any]] = [p() for p in probes]
        if req.args:
            calls.insert(0, run_state(self.store, req, self.names, self.fail_open))
        # Every call ends before a failure is raised: no probe is left running unobserved.
        results = await asyncio.gather(*calls, return_exceptions=True)
        if not req.args:
            return NOTHING_ASKED
        if isinstance(results[0], BaseException):
            raise results[0]
        return state_reply(results[0])

    async def _local(self, req: Request) -> None:
        """Answer from an in-process tier with no Valkey round trip at all."""
        stored: Stored = req.data["answer"]
        await stored.send(req.ctx.send, req.data["answer_headers"], req.ctx.method == "HEAD")

    def _keep(self, req: Request) -> int | None:
        """How much of the response body to keep: the most any part keeps (None: none)."""
        keep: int | None = None
        for part in self.keepers:
            wanted = part.keeps(req)
            if wanted is not None and (keep is None or wanted > keep):
                keep = wanted
        return keep

    async def _answer(self, req: Request, stored: Stored, outcome: Outcome) -> None:
        send = _recording(req.ctx.send, outcome, req.extra, keep=self._keep(req))
        await stored.send(send, req.data.get("answer_headers", []), req.ctx.method == "HEAD")

    async def _waited(self, req: Request, wait: Callable[[], Awaitable[Stored | None]]) -> Any:
        """A miss that lost the lock: the entry the first one stored, or None to run the handler."""
        try:
            return await wait()
        except StorageError as exc:
            # The backend went away while this miss waited on another request's entry: run
            # the handler (fail open) or refuse, as for the first call.
            _without_backend(req.ctx.route, exc, exc.fail_open)
            return None

    async def _watched(self, ctx: Context, call_next: Handler, outcome: Outcome) -> None:
        """Run the handler, cancelling it when the client goes away before the response.

        Servers keep running a handler whose client left and drop what it sends, so a
        part that must not charge or hold a slot for nobody (credits refunded on
        `disconnect`, concurrency limits) listens for `http.disconnect` meanwhile.
        """
        # the body is consumed first, so only a disconnect can arrive
        await read_body(ctx, self.body_limit)
        listen = upstream_of(ctx.receive)
        with anyio.CancelScope() as scope:

            async def watch() -> None:
                message = await listen()
                if message["type"] == "http.disconnect" and not outcome.done:
                    outcome.error = ClientGone("the client disconnected before the response")
                    scope.cancel()

            watcher = asyncio.get_running_loop().create_task(watch())
            try:
                await call_next(ctx)
            finally:
                watcher.cancel()

    async def _finish(self, req: Request, outcome: Outcome) -> None:
        """Queue the after-handler ops; await their reply when a retry depends on it."""
        pending = self._finish_now(req, outcome)
        if pending is not None:
            await pending

    def _finish_now(self, req: Request, outcome: Outcome) -> Awaitable[None] | None:
        """`_finish` without a coroutine where nothing is awaited (the common case): the
        ops are queued now; an awaitable is returned only when their reply must be awaited.
        """
        if req.data.get(FINISHED):
            return None
        req.data[FINISHED] = True
        if req.ctx.state.get(BODY_REFUSED):
            outcome.handler_ran = False
        for part in self.finishers:
            part.after(req, outcome)
        if not req.finish_args:
            return None
        store = self.store
        route = req.ctx.route
        if store.queues_first and not req.data.get("id_owner"):
            # The auto-pipelined store (one server) queues the script at once and nobody
            # waits for its reply: the response has gone, and every later command on this
            # store is sent behind it. Queued before any await, so even a cancelled request
            # (client gone) still releases and refunds. An idempotency record's owner waits:
            # a retry, perhaps to another process, must find the record settled.
            store.submit(
                "finish",
                req.finish_keys,
                req.finish_args,
                operation=self.finish_op,
                on_error=self._on_error(route),
                joins=True,
            )
            return None
        return self._settled(req, route)

    async def _settled(self, req: Request, route: str) -> None:
        """The after-handler ops, their reply awaited (an idempotency owner, a cluster)."""
        store = self.store
        try:
            if store.queues_first:
                # Queued before the first await: a cancelled request still settles; no shield.
                await run_finish(store, req, self.finish_op)
            else:
                # Shielded: a cancelled request (client gone) must still release and refund.
                with anyio.CancelScope(shield=True):
                    await run_finish(store, req, self.finish_op)
        except StorageError as exc:
            _finish_failed(route, exc)

    async def _without_backend(self, ctx: Context, call_next: Handler, exc: StorageError) -> None:
        _without_backend(ctx.route, exc, self.fail_open)
        for part in self.parts:
            BACKEND_FAILED_OPEN[part.name] += 1
        await call_next(ctx)


def _without_backend(route: str, exc: StorageError, fail_open: bool) -> None:
    """Count a backend failure; refuse with 503 unless the request may go on without it."""
    backend_error(route, exc)
    if not fail_open:
        raise Denial(
            Problems.BACKEND_UNAVAILABLE,
            "the policy backend is unavailable; try again shortly",
            headers={"Retry-After": "1"},
        ) from exc
    backend_warning(route, exc)  # one line an interval; the metric counts each


def _finish_failed(route: str, exc: StorageError) -> None:
    """An after-handler call failed: count it and say so (the response has gone)."""
    backend_error(route, exc)
    backend_warning(route, exc)


class _Hearing:
    """A `receive` that marks `outcome.gone` when it hands the app an `http.disconnect`.

    An object, not a closure with an attribute: made for every request of a route with
    credits, and most handlers never call it.
    """

    __slots__ = ("outcome", "receive")

    def __init__(self, receive: Receive, outcome: Outcome) -> None:
        self.receive = receive
        self.outcome = outcome

    @property
    def upstream(self) -> Receive:
        """The server's own receive (`upstream_of`), found when asked: most handlers never do."""
        return upstream_of(self.receive)

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.outcome.gone = True
        return message


# The status an accepted websocket session counts as (what the handshake answers).
WEBSOCKET_ACCEPTED: Final = 101


def _recording(
    send: Send,
    outcome: Outcome,
    extra: Sequence[Header],
    *,
    keep: int | None,
    before_last: Callable[[], Awaitable[None]] | None = None,
) -> Send:
    """A `send` that adds `extra` headers to the response and records what was sent.

    The body is kept up to `keep` bytes (nothing when None): past that, what was kept is
    dropped and the rest streams through, so a large response never sits in memory.
    `before_last` runs once the whole response is known, before its last body message.
    """

    def record(message: Message) -> Awaitable[None]:
        # A plain function: only the last body message needs a frame of its own (`_last`),
        # every other message is handed to the server's send as it is (or with `extra`).
        # Messages are dicts (the compiled build then reads them with native dict calls).
        fields = message if isinstance(message, dict) else dict(message)
        kind = fields["type"]
        if kind == "http.response.start" or kind == "websocket.http.response.start":
            outcome.started = True
            outcome.status = int(fields["status"])
            outcome.headers = list(fields.get("headers", []))
            if extra:
                message = {**fields, "headers": [*outcome.headers, *extra]}
        elif kind == "http.response.body" or kind == "websocket.http.response.body":
            if keep is not None:
                chunk = fields.get("body", b"")
                outcome.size += len(chunk)
                if outcome.size <= keep:
                    outcome.body.extend(chunk)
                elif not outcome.dropped:
                    outcome.dropped = True
                    outcome.body = bytearray()
            if not fields.get("more_body", False):
                return _last(send, message, outcome, before_last)
        elif kind == "websocket.accept":
            # A websocket session started: it is over (done) when its handler returns.
            outcome.started = True
            outcome.status = WEBSOCKET_ACCEPTED
        return send(message)

    return record


async def _last(
    send: Send,
    message: Message,
    outcome: Outcome,
    before_last: Callable[[], Awaitable[None]] | None,
) -> None:
    """The response's last body message: `before_last` first; done once it was sent."""
    if before_last is not None:
        outcome.done = True
        await before_last()
    await send(message)
    outcome.done = True


# Bodies up to this size are read before the handler so a disconnect can be watched for;
# a larger or streamed body goes to the handler as it arrives (its slot is then released
# and its credits settled when the handler ends, not when the client leaves).
WATCH_BODY_LIMIT = 1 << 20


def _buffered(ctx: Context) -> bool:
    """Whether the request body may be read up front (known and small, or absent).

    Never for a websocket: it has no body, and its handler hears the client leave itself.
    """
    if ctx.scope["type"] != "http":
        return False
    if ctx.method in ("GET", "HEAD", "OPTIONS", "DELETE"):
        return True
    length = ctx.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) <= WATCH_BODY_LIMIT


STATE_KEYS = ("rate_limit", "credits", "idempotency", "cache")


def sealed(policy: RoutePolicy) -> bool:
    """Whether a route's data is kept encrypted at rest."""
    return policy.sensitive or bool(policy.encrypt_fields or policy.decrypt_fields)


def make_state(policy: RoutePolicy, env: Env) -> Step | None:
    """The fused step of a route's stateful keys; None when it sets none of them."""
    makers = (make_rate_limit_part, make_credits_part, make_idempotency_part, make_cache_part)
    wanted = [m for m, k in zip(makers, STATE_KEYS, strict=True) if getattr(policy, k)]
    if not wanted:
        return None
    store: ValkeyStore = env.service(
        "valkey", "/".join(k for k in STATE_KEYS if getattr(policy, k))
    )
    vault = PLAIN
    joins = any(lim.on_repeat == "join" for lim in policy.rate_limit)
    if sealed(policy) and (policy.cache or policy.idempotency or joins):
        vault = Vault(env.service("keyring", "sensitive data at rest (POLICYROUTE_DATA_KEYS)"))
    parts = [p for m in wanted if (p := m(policy, store, vault)) is not None]
    return StateStep(store, parts, body_limit(policy, env))


register(STATE_KEYS, make_state)
