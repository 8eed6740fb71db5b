"""The fused stateful step: every stateful pre-check of a request in one Valkey round trip.

`rate_limit`, `credits`, `idempotency` and `cache` each compile to their own part
(`RateLimitStep`, `CreditsStep`, `IdempotencyStep`, `CacheStep`). The compiler folds the
parts of a route into one `StateStep`, which evaluates `lua/state.lua` once before the
handler and `lua/finish.lua` once after it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import Message, Receive, Send

from .._ids import IDS
from ..asgi._entry import ENTERED
from ..backends.valkey import Arg, Store
from ..compile.compiler import Env, register
from ..crypto import Keyring
from ..errors import Denial, Problems, StorageError
from ..language.policy import RoutePolicy
from ..observability.metrics import backend_error
from ..observability.repeats import backend_warning
from ..principal import address_tag, subject_tag
from .base import Context, Handler, Step
from .slots import run_finish, run_state

# The most a step reads of a request body when neither the route nor the settings say.
DEFAULT_MAX_BODY = 1 << 20
# Requests that went on without a policy backend (a step configured `on_backend_error: open`).
BACKEND_FAILED_OPEN: Counter[str] = Counter()

Header = tuple[bytes, bytes]


@functools.lru_cache(maxsize=4096)
def route_id(route: str) -> str:
    """A short stable id of a route for key names (no spaces, no user input)."""
    return hashlib.sha256(route.encode()).hexdigest()[:12]


def digest(value: str | bytes) -> str:
    """A short digest of a request-supplied value, so raw keys never appear in Valkey."""
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return hashlib.sha256(raw).hexdigest()[:32]


def principal_tag(ctx: Context) -> str:
    """The hash tag of the caller's state: its account when authenticated, else its address.

    Every per-principal key (credits, `user` limits and concurrency slots, idempotency
    records, private cache entries) is made under this tag; the account names issuer and
    tenant when the settings need them (`principal.Accounts`).
    """
    account = ctx.principal.account
    if account is not None:
        return subject_tag(account)
    return address_tag(ctx.client)


@dataclass(slots=True)
class Stored:
    """A response as stored in Valkey: status, raw headers, body.

    `unkept` is the size of a body too large to keep: the record then holds the status
    alone (an idempotency record of a response past `idempotency.max_body`).
    """

    status: int
    headers: list[Header]
    body: bytes
    unkept: int = 0

    def encode(self) -> tuple[int, bytes, bytes]:
        """(status, header block, body) for the Lua scripts, which keep them opaque.

        The header block is names and values joined by NUL, which no valid header holds;
        headers that do hold one (or an empty list) are written as a JSON list instead.
        A record without its body has a JSON object there, which neither form starts with.
        """
        if self.unkept:
            return self.status, json.dumps({"unkept": self.unkept}).encode(), b""
        flat = [item for pair in self.headers for item in pair]
        block = b"\0".join(flat)
        if block.count(b"\0") != len(flat) - 1 or block[:1] == b"[":
            pairs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers]
            block = json.dumps(pairs, separators=(",", ":")).encode()
        return self.status, block, self.body

    @classmethod
    def decode(cls, code: Any, headers: Any, body: Any) -> Stored:
        """The response from the script's reply fields (either header block form)."""
        raw = headers.encode() if isinstance(headers, str) else bytes(headers)
        if raw[:1] == b"{":
            return cls(int(code), [], b"", unkept=int(json.loads(raw)["unkept"]))
        if raw[:1] == b"[":
            pairs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(raw)]
        else:
            items = raw.split(b"\0")
            pairs = list(zip(items[::2], items[1::2], strict=True))
        return cls(int(code), pairs, bytes(body))

    async def send(self, send: Send, extra: Sequence[Header], head: bool) -> None:
        """Send the stored response byte for byte, plus `extra` headers."""
        start: Message = {
            "type": "http.response.start",
            "status": self.status,
            "headers": [*self.headers, *extra],
        }
        await send(start)
        await send({"type": "http.response.body", "body": b"" if head else self.body})


@dataclass(frozen=True, slots=True)
class Vault:
    """How a route's records reach Valkey: as they are, or sealed with the data keys.

    Routes marked `sensitive` (or naming encrypt/decrypt fields) keep cached responses
    and idempotency records as AES-GCM ciphertext bound to their Valkey key, and
    fingerprint request bodies with a keyed digest instead of a plain hash.
    """

    keyring: Keyring | None = None

    def pack(self, stored: Stored, key: str) -> tuple[int, bytes, bytes]:
        """The record fields the finish script writes."""
        code, headers, body = stored.encode()
        if self.keyring is None:
            return code, headers, body
        aad = key.encode()
        return code, self.keyring.seal(headers, aad), self.keyring.seal(body, aad)

    def unpack(self, key: str, code: Any, headers: Any, body: Any) -> Stored:
        """The response from stored record fields; raise DataKeyError when it does not open."""
        if self.keyring is not None:
            aad = key.encode()
            headers = self.keyring.open(bytes(headers), aad)
            body = self.keyring.open(bytes(body), aad)
        return Stored.decode(code, headers, body)

    def fingerprint(self, data: bytes) -> str:
        """A digest of a request for comparing repeats (keyed when sealed)."""
        if self.keyring is None:
            return hashlib.sha256(data).hexdigest()
        return self.keyring.fingerprint(data)


PLAIN = Vault()


@dataclass(slots=True)
class Request:
    """What the parts of one request compute and share.

    Ops are appended with `op` (before the handler) and `finish` (after it); each op is
    an opcode with its arguments and the keys it touches, kept flat for one script call
    and marked so a cluster can split them by hash tag (`steps/slots.py`).
    """

    ctx: Context
    keys: list[str] = field(default_factory=list)
    args: list[Arg] = field(default_factory=list)
    marks: list[tuple[int, int]] = field(default_factory=list)
    token: str = ""
    extra: list[Header] = field(default_factory=list)
    finish_keys: list[str] = field(default_factory=list)
    finish_args: list[Arg] = field(default_factory=list)
    finish_marks: list[tuple[int, int]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def op(self, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Queue an op (opcode first in `args`) for the before-handler script."""
        self.marks.append((len(self.keys), len(self.args)))
        self.keys.extend(keys)
        self.args.extend(args)

    def finish(self, op: str, keys: Sequence[str], *args: Arg) -> None:
        """Queue an op for the after-handler script."""
        self.finish_marks.append((len(self.finish_keys), len(self.finish_args)))
        self.finish_keys.extend(keys)
        self.finish_args.append(op)
        self.finish_args.extend(args)

    def probe(self, call: Callable[[], Awaitable[None]]) -> None:
        """Run `call` alongside the before-handler script (shadow-mode evaluations).

        A probe never raises: it keeps its findings in `data` for its part's `settle`.
        """
        self.data.setdefault(PROBES, []).append(call)

    def absorb(self, other: Request) -> None:
        """Take over another request's after-handler ops (a probe's releases and undos)."""
        k0, a0 = len(self.finish_keys), len(self.finish_args)
        self.finish_marks.extend((k + k0, a + a0) for k, a in other.finish_marks)
        self.finish_keys.extend(other.finish_keys)
        self.finish_args.extend(other.finish_args)


PROBES = "probes"
# req.data: what must be awaited after the parts settled and before the answer or the
# handler (a throttle's turn, a debounce waiting to join another request's response).
PAUSES = "pauses"
# The reply of a request whose parts asked Valkey nothing but shadow probes.
NOTHING_ASKED = ["go", [], [], []]


@dataclass(slots=True)
class Outcome:
    """How the request ended, as the after-handler parts need it."""

    handler_ran: bool = False
    status: int = 0
    headers: list[Header] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    started: bool = False
    done: bool = False
    error: BaseException | None = None
    # Body bytes sent, counted while a part keeps the body; `dropped` once they passed
    # what any part keeps (`body` is then empty, and the response streamed through).
    size: int = 0
    dropped: bool = False
    # The app was told the client disconnected (`http.disconnect`): a response it left
    # unfinished without raising was cut short by the client, not by the app.
    gone: bool = False

    @property
    def complete(self) -> Stored | None:
        """The full response when one was sent completely and kept."""
        if not self.done or self.dropped:
            return None
        return Stored(self.status, list(self.headers), bytes(self.body))


class Part(Step):
    """One stateful policy key inside the fused `StateStep`."""

    guard = False
    fail_open: bool = False
    # Whether the handler must stop (and this part settle) when the client goes away.
    watch_disconnect: bool = False
    # Whether `after` needs to know that the app was told the client left (`Outcome.gone`).
    hears_disconnect: bool = False

    def peek(self, req: Request) -> None:
        """Answer from process memory before any part queues an op (the cache's first tier)."""

    # Whether `prepare` must await (read the request body): then `prepare_io` runs instead.
    needs_io: bool = False
    # The most a part that reads the whole request body reads (`make_state` sets it).
    body_limit: int = DEFAULT_MAX_BODY

    def prepare(self, req: Request) -> None:
        """Check what needs no backend (may raise Denial) and append this part's op."""

    async def prepare_io(self, req: Request) -> None:
        """`prepare` for a part that must await first (`needs_io`)."""
        self.prepare(req)

    def settle(self, req: Request, reply: list[Any]) -> None:
        """Read this part's share of the script's reply; may raise Denial."""

    def keeps(self, req: Request) -> int | None:
        """The most body bytes this part keeps of the request's response; None: none."""
        return None

    def after(self, req: Request, outcome: Outcome) -> None:
        """Queue after-handler ops for the finish script."""


def _reply_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


FINISHED = "finished"  # req.data: the after-handler ops ran (once, early or at the end)
# ctx.state: the request's body was refused (413) as it was read, by a step or the handler;
# the request then counts as refused before its endpoint ran (never charged).
BODY_REFUSED = "body_refused"


class ClientGone(Exception):  # noqa: N818 - an outcome, recorded rather than raised
    """The client disconnected while the handler ran."""


class StateStep(Step):
    """rate_limit -> credits -> idempotency -> cache, fused into one Valkey round trip."""

    name = "state"
    guard = False

    def __init__(
        self, store: Store, parts: Sequence[Part], body_limit: int = DEFAULT_MAX_BODY
    ) -> None:
        self.store = store
        self.parts = tuple(parts)
        self.body_limit = body_limit
        for part in self.parts:
            part.body_limit = body_limit
        # Closed wins: a request goes on without the backend only when every part allows it.
        self.fail_open = all(p.fail_open for p in self.parts)
        self.names = ",".join(p.name for p in self.parts)
        self.finish_op = f"{self.names} finish"
        self.peekers = tuple(p for p in self.parts if type(p).peek is not Part.peek)
        self.watch = any(p.watch_disconnect for p in self.parts)
        self.hear = any(p.hears_disconnect for p in self.parts)
        self.keepers = tuple(p for p in self.parts if type(p).keeps is not Part.keeps)

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
        req = Request(ctx, token=IDS.next())
        for peeker in self.peekers:
            peeker.peek(req)
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
        try:
            if probes:
                reply = await self._with_probes(req, probes)
            else:
                reply = await run_state(self.store, req, self.names, self.fail_open)
        except StorageError as exc:
            await self._without_backend(ctx, call_next, exc)
            return
        verdict = _reply_text(reply[0])
        req.data["verdict"] = verdict
        outcome = Outcome()
        try:
            for part in self.parts:
                part.settle(req, reply)
            for pause in req.data.get(PAUSES, ()):
                await pause()
            stored: Stored | None = req.data.get("answer")
            if stored is not None:
                await self._answer(req, stored, outcome)
            else:
                await self._run(req, call_next, outcome)
        except Denial as denial:
            if not outcome.started:
                outcome.status = denial.status
                outcome.error = denial
                denial.headers.update({k.decode(): v.decode() for k, v in req.extra})
            raise
        except BaseException as exc:
            outcome.error = exc
            raise
        finally:
            await self._finish(req, outcome)

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
        return results[0]

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

    async def _run(self, req: Request, call_next: Handler, outcome: Outcome) -> None:
        wait = req.data.get("wait")
        if wait is not None:
            try:
                stored = await wait()
            except StorageError as exc:
                # The backend went away while this miss waited on another request's
                # entry: run the handler (fail open) or refuse, as for the first call.
                _without_backend(req.ctx.route, exc, exc.fail_open)
                stored = None
            if stored is not None:
                await self._answer(req, stored, outcome)
                return
        ctx = req.ctx
        original = ctx.send
        received = ctx.receive
        if self.hear:
            ctx.receive = _hearing(received, outcome)
        # A request that owns an idempotency record stores it before the client sees the
        # end of the response, so a retry sent right after the response is a replay, not
        # a 409 for a request still "in flight".
        settle_first = req.data.get("id_owner")
        ctx.send = _recording(
            original,
            outcome,
            req.extra,
            keep=self._keep(req),
            before_last=(lambda: self._finish(req, outcome)) if settle_first else None,
        )
        # A FastAPI endpoint marks `outcome` when it is called: validation may refuse the
        # request (422, 400) inside the route without calling it. Any other runs when called.
        entered = ENTERED.set(outcome) if ctx.marks_entry else None
        if entered is None:
            outcome.handler_ran = True
        try:
            if self.watch and _buffered(ctx):
                await self._watched(ctx, call_next, outcome)
            else:
                await call_next(ctx)
        finally:
            ctx.send = original
            ctx.receive = received
            if entered is not None:
                ENTERED.reset(entered)

    async def _watched(self, ctx: Context, call_next: Handler, outcome: Outcome) -> None:
        """Run the handler, cancelling it when the client goes away before the response.

        Servers keep running a handler whose client left and drop what it sends, so a
        part that must not charge or hold a slot for nobody (credits refunded on
        `disconnect`, concurrency limits) listens for `http.disconnect` meanwhile.
        """
        # the body is consumed first, so only a disconnect can arrive
        await read_body(ctx, self.body_limit)
        listen = _after_replay(ctx.receive)
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
        if req.data.get(FINISHED):
            return
        req.data[FINISHED] = True
        if req.ctx.state.get(BODY_REFUSED):
            outcome.handler_ran = False
        for part in self.parts:
            part.after(req, outcome)
        if not req.finish_args:
            return
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
                on_error=functools.partial(_finish_failed, route),
                joins=True,
            )
            return
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


def _hearing(receive: Receive, outcome: Outcome) -> Receive:
    """A `receive` that marks `outcome.gone` when it hands the app an `http.disconnect`."""

    async def hear() -> Message:
        message = await receive()
        if message["type"] == "http.disconnect":
            outcome.gone = True
        return message

    hear.upstream = getattr(receive, "upstream", receive)  # type: ignore[attr-defined]
    return hear


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

    async def record(message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            outcome.started = True
            outcome.status = int(message["status"])
            outcome.headers = list(message.get("headers", []))
            if extra:
                message = {**message, "headers": [*outcome.headers, *extra]}
        elif kind == "http.response.body":
            if keep is not None:
                chunk = message.get("body", b"")
                outcome.size += len(chunk)
                if outcome.size <= keep:
                    outcome.body.extend(chunk)
                elif not outcome.dropped:
                    outcome.dropped = True
                    outcome.body = bytearray()
            if not message.get("more_body", False):
                if before_last is not None:
                    outcome.done = True
                    await before_last()
                await send(message)
                outcome.done = True
                return
        await send(message)

    return record


def body_too_large(limit: int, size: int | None = None) -> Denial:
    """413 body-too-large: of `size` bytes as declared, or (None) grown past `limit`."""
    if size is None:
        detail = f"the request body is larger than this route takes ({limit} bytes)"
    else:
        detail = f"the request body is {size} bytes; this route takes at most {limit}"
    return Denial(Problems.BODY_TOO_LARGE, detail, extra={"limit": limit})


def declared_length(ctx: Context) -> int | None:
    """The request's Content-Length, when it sends a valid one."""
    length = ctx.headers.get("content-length")
    return int(length) if length is not None and length.isdigit() else None


async def read_body(ctx: Context, limit: int | None = None) -> bytes:
    """Read the whole request body once and let the handler read it again.

    With a `limit`, a larger body is refused (413): before anything is read when its
    Content-Length says so, else as soon as it grows past it, so at most `limit` bytes
    are ever held.
    """
    if limit is not None:
        declared = declared_length(ctx)
        if declared is not None and declared > limit:
            ctx.state[BODY_REFUSED] = True
            raise body_too_large(limit, declared)
    body, whole = await _read(ctx, limit)
    if not whole:
        assert limit is not None
        ctx.state[BODY_REFUSED] = True
        raise body_too_large(limit)
    return body


async def read_body_upto(ctx: Context, limit: int) -> bytes | None:
    """The whole request body when it is at most `limit` bytes, else None.

    Refuses nothing: past `limit` it stops reading, and the handler reads what was read
    followed by the rest as it streams, so at most `limit` bytes are held.
    """
    declared = declared_length(ctx)
    if declared is not None and declared > limit:
        return None
    body, whole = await _read(ctx, limit)
    return body if whole else None


async def _read(ctx: Context, limit: int | None) -> tuple[bytes, bool]:
    """Read the body, at most `limit` bytes of it; (what was read, whether it is whole).

    The handler then reads it again: the whole body, or what was read followed by the
    rest as it streams.
    """
    chunks: list[bytes] = []
    size = 0
    receive = ctx.receive
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        more = bool(message.get("more_body", False))
        if limit is not None and size > limit:
            ctx.receive = replay(b"".join(chunks), receive, more=more)
            return b"", False
        if not more:
            break
    body = b"".join(chunks)
    ctx.receive = replay(body, receive)
    return body, True


def is_json(headers: Sequence[Header]) -> bool:
    """Whether response headers declare a JSON body (application/json or any +json type)."""
    for name, value in headers:
        if name.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


def replay(body: bytes, then: Receive, *, more: bool = False) -> Receive:
    """A receive that yields `body` once, then whatever `then` yields.

    `body` is the whole request, or with `more` the start of it (the rest comes from
    `then`). The server's own receive stays reachable as its `upstream` attribute.
    """
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await then()

    receive.upstream = getattr(then, "upstream", then)  # type: ignore[attr-defined]
    return receive


# Bodies up to this size are read before the handler so a disconnect can be watched for;
# a larger or streamed body goes to the handler as it arrives (its slot is then released
# and its credits settled when the handler ends, not when the client leaves).
WATCH_BODY_LIMIT = 1 << 20


def _buffered(ctx: Context) -> bool:
    """Whether the request body may be read up front (known and small, or absent)."""
    if ctx.method in ("GET", "HEAD", "OPTIONS", "DELETE"):
        return True
    length = ctx.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) <= WATCH_BODY_LIMIT


def _after_replay(receive: Receive) -> Receive:
    """The receive behind `read_body`'s replay (the server's own), else `receive` itself."""
    found: Receive = getattr(receive, "upstream", receive)
    return found


async def sleep_ms(ms: float) -> None:
    """Sleep a number of milliseconds."""
    await asyncio.sleep(ms / 1000)


STATE_KEYS = ("rate_limit", "credits", "idempotency", "cache")


def sealed(policy: RoutePolicy) -> bool:
    """Whether a route's data is kept encrypted at rest."""
    return policy.sensitive or bool(policy.encrypt_fields or policy.decrypt_fields)


def make_state(policy: RoutePolicy, env: Env) -> Step | None:
    """The fused step of a route's stateful keys; None when it sets none of them."""
    from .cache import make_cache_part
    from .credits import make_credits_part
    from .idempotency import make_idempotency_part
    from .rate_limit import make_rate_limit_part

    makers = (make_rate_limit_part, make_credits_part, make_idempotency_part, make_cache_part)
    wanted = [m for m, k in zip(makers, STATE_KEYS, strict=True) if getattr(policy, k)]
    if not wanted:
        return None
    store: Store = env.service("valkey", "/".join(k for k in STATE_KEYS if getattr(policy, k)))
    vault = PLAIN
    joins = any(lim.on_repeat == "join" for lim in policy.rate_limit)
    if sealed(policy) and (policy.cache or policy.idempotency or joins):
        vault = Vault(env.service("keyring", "sensitive data at rest (POLICYROUTE_DATA_KEYS)"))
    parts = [p for m in wanted if (p := m(policy, store, vault)) is not None]
    return StateStep(store, parts, body_limit(policy, env))


def body_limit(policy: RoutePolicy, env: Env) -> int:
    """The most a step of the route reads of a request body: `request.max_body`, else
    the process's `max_body` setting."""
    limits = policy.request
    if limits is not None and limits.max_body is not None:
        return limits.max_body
    return env.config.max_body


register(STATE_KEYS, make_state)
