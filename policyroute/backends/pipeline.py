"""Auto-pipelining: commands issued in one event-loop tick share writes on one connection.

Concurrent requests each need one script call before their handler. Sent one by one
through a connection pool, each call pays a pool checkout, a write syscall and a read
wake-up. Here commands queue until the end of the current tick, go out as one write on
one connection, and replies are matched to callers in order as they are parsed
(libvalkey's reader, fed from an asyncio protocol: no task per read).

Replies reach their callers by construction, whatever the timing:
- each connection has its own queue of callers, in the order their commands were
  written; a reply is only ever matched against the queue of the connection it came on;
- nothing is written on a connection before its handshake (AUTH, SELECT, script loads)
  has completed: commands wait in `pending` meanwhile;
- a connection that fails (closed, reset, a reply nobody on it waits for, no reply within
  the timeout) fails every caller in its queue at once with a retriable connection error
  and is never used again; bytes it receives later go nowhere.
A connection counts as stalled when its oldest unanswered command has waited `timeout`
with no reply at all (large writes get time in proportion to their size), so a slow but
moving stream is not mistaken for a dead server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, cast

import libvalkey
from valkey.asyncio.connection import SSLConnection, parse_url
from valkey.exceptions import ConnectionError as ValkeyConnectionError
from valkey.exceptions import InvalidResponse, NoScriptError, ResponseError, ValkeyError
from valkey.exceptions import TimeoutError as ValkeyTimeoutError

Arg = str | bytes | int | float

_NOT_ENOUGH: Final = object()

# A batch leaves at the end of the event-loop tick, or as soon as this many commands wait
# (a bound on the batch under very many concurrent requests). Each write is a syscall of
# ~17 µs on loopback, so fewer, larger writes cost less CPU: the full chain's server CPU per
# request was 286 µs at 8, 281 at 16 and 32, 271 at 1000 (paired runs of 8 rounds, bare
# 191 µs); 4 was worse still (310 against 287).
EARLY_WRITE = 32

# Arguments one joined script call may carry (`Pipeline.join`): a bound on the time one
# call holds the server.
JOIN_ARGS: Final = 512
_running_loop: Final = asyncio.get_running_loop  # per call: bound once

# A write larger than this gives its commands extra time before the connection counts as
# stalled: one second per BYTES_PER_SECOND bytes (far below loopback's rate), so a large
# record is not mistaken for a dead server and the commands behind it are not failed.
LARGE_WRITE: Final = 64 * 1024
BYTES_PER_SECOND: Final = 20_000_000

# An overdue connection is failed only if it is still overdue this long after the event
# loop next ran: a blocked loop (a long CPU step) must not look like a dead server.
GRACE: Final = 0.005


def parse_error(text: str) -> ResponseError:
    """The exception for an error reply (NOSCRIPT gets its own class)."""
    code, _, rest = text.partition(" ")
    return NoScriptError(rest) if code == "NOSCRIPT" else ResponseError(text)


# RESP, written here rather than by libvalkey's packer (which spells every length with
# sprintf): lengths and counts below SHORT come from tables, and the text most calls send
# (script shas, a route's static arguments, opcodes, a subject's keys) as whole fragments
# made once. A fragment is a function of its text alone, so a remembered one is always the
# bytes the text packs to. `tests/backends/test_pack.py` holds it to libvalkey's packer.
SHORT: Final = 1024
_LENGTHS: Final = [b"$%d\r\n" % n for n in range(SHORT)]
_COUNTS: Final = [b"*%d\r\n" % n for n in range(SHORT)]
_NUMBERS: Final = [b"$%d\r\n%d\r\n" % (len(str(n)), n) for n in range(SHORT)]
_CRLF: Final = b"\r\n"
# Fragments kept for good (`pin`: what steps send on every call, made where they are built),
# and those remembered besides (`remember`), within FRAGMENT_MEMO; short text (opcodes) is
# remembered when first packed.
FRAGMENT_MEMO = 16_384
SHORT_TEXT: Final = 8
_PINNED: Final[dict[str, bytes]] = {}
_FRAGMENTS: Final[dict[str, bytes]] = {}


def fragment(text: str) -> bytes:
    """One argument in RESP: a bulk string."""
    raw = text.encode()
    size = len(raw)
    return (_LENGTHS[size] if size < SHORT else b"$%d\r\n" % size) + raw + _CRLF


def pin(texts: Sequence[str]) -> None:
    """Keep the fragments of text that calls send again and again (never forgotten).

    Text pinned past half of FRAGMENT_MEMO (policies built again and again, each with
    other values) is only remembered.
    """
    for text in texts:
        if text in _PINNED:
            continue
        if len(_PINNED) >= FRAGMENT_MEMO // 2:
            remember(text)
        else:
            _PINNED[text] = _FRAGMENTS[text] = fragment(text)


def remember(text: str) -> None:
    """Keep the fragment of text many calls send for a while (a subject's key)."""
    if len(_FRAGMENTS) >= FRAGMENT_MEMO:
        _FRAGMENTS.clear()  # many subjects: start again rather than grow
        _FRAGMENTS.update(_PINNED)
    _FRAGMENTS[text] = fragment(text)


def _append(out: list[bytes], args: Sequence[Arg]) -> None:
    """Append the RESP of each argument to `out` (text as UTF-8, numbers spelled)."""
    fragments = _FRAGMENTS
    for a in args:
        if type(a) is str:
            found = fragments.get(a)
            if found is not None:
                out.append(found)
                continue
            if len(a) <= SHORT_TEXT:
                out.append(_remembered(a))
                continue
            raw = a.encode()
        elif type(a) is bytes:
            raw = a
        elif type(a) is int:
            if 0 <= a < SHORT:
                out.append(_NUMBERS[a])
                continue
            raw = str(a).encode()
        else:
            raw = _raw(a)
        size = len(raw)
        out.append(_LENGTHS[size] if size < SHORT else b"$%d\r\n" % size)
        out.append(raw)
        out.append(_CRLF)


def _remembered(text: str) -> bytes:
    remember(text)
    return _FRAGMENTS[text]


def _raw(a: object) -> bytes:
    """An argument of another type as it goes on the wire (`_spelled`, as bytes)."""
    spelled = _spelled(a)
    return spelled.encode() if isinstance(spelled, str) else bytes(spelled)


def _count(count: int) -> bytes:
    return _COUNTS[count] if count < SHORT else b"*%d\r\n" % count


def _number(n: int) -> bytes:
    return _NUMBERS[n] if 0 <= n < SHORT else fragment(str(n))


def _evalsha(out: list[bytes], count: int, sha: str, keys: int) -> None:
    """The head of an EVALSHA of `count` arguments in all: the name, the sha, the key count."""
    out.append(_count(count))
    out.append(_EVALSHA)
    out.append(_FRAGMENTS.get(sha) or fragment(sha))
    out.append(_number(keys))


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [_count(len(args))]
    _append(out, args)
    return b"".join(out)


def _spelled(a: object) -> str | bytes:
    """An argument as it goes on the wire: bytes and text as they are, numbers spelled (a
    bool as 1 or 0, as valkey-py spells it)."""
    if isinstance(a, (str, bytes)):
        return a
    if isinstance(a, float):
        return repr(float(a))
    if isinstance(a, int):
        return str(int(a))
    raise TypeError(f"a {type(a).__name__} cannot be sent to Valkey: text, bytes or a number")


def wire(args: Sequence[Arg]) -> tuple[str | bytes, ...]:
    """`args` spelled as they go on the wire, for arguments a route sends on every call.

    Made once where a step is built; their fragments are kept (`pin`), so a call copies
    them whole.
    """
    spelled = tuple(_spelled(a) for a in args)
    pin([a for a in spelled if type(a) is str])
    return spelled


_EVALSHA: Final = fragment("EVALSHA")
_JOINED: Final = fragment("*")


class _Joined:
    """Calls of one script whose ops run in sequence, sent as one EVALSHA (`Pipeline.join`).

    Holds each caller's keys and arguments as given (callers do not change them once
    queued: `Store.submit`), packed when the batch is written.
    """

    __slots__ = ("args", "callers", "keys", "sections", "sha")

    def __init__(self, sha: str, keys: Sequence[str], args: Sequence[Arg], caller: object) -> None:
        self.sha = sha
        self.sections = [(keys, args)]
        self.keys = len(keys)
        self.args = len(args)  # arguments after the keys (`JOIN_ARGS` bounds them)
        self.callers = [caller]

    def add(self, keys: Sequence[str], args: Sequence[Arg], caller: object) -> None:
        """Another caller's ops, run after those already joined."""
        self.sections.append((keys, args))
        self.keys += len(keys)
        self.args += len(args)
        self.callers.append(caller)

    def pack_into(self, out: list[bytes]) -> None:
        """The one EVALSHA that runs every joined call's ops in order."""
        _evalsha(out, 3 + self.keys + self.args, self.sha, self.keys)
        for keys, _ in self.sections:
            _append(out, keys)
        for _, args in self.sections:
            _append(out, args)


class _Shared:
    """Calls of one script by several callers, each with a reply of its own, sent as one
    EVALSHA (`Pipeline.share`).

    In a connection's queue it stands where a future would: the reply, one per caller in
    order, is handed out as it is read (an error in one caller's part is that caller's
    alone), and a failure of the whole call reaches every caller.
    """

    __slots__ = ("args", "futures", "keys", "sections", "sha")

    def __init__(
        self, sha: str, keys: Sequence[str], args: Sequence[Arg], future: asyncio.Future[Any]
    ) -> None:
        self.sha = sha
        # Each caller's keys and arguments as given (`Store.run`'s caller awaits meanwhile).
        self.sections = [(keys, args)]
        self.keys = len(keys)
        # Arguments after the keys in the joined form, but for its head and "*": each
        # section's two counts and its arguments after the head (`JOIN_ARGS` bounds them).
        self.args = len(args) + 1
        self.futures = [future]

    def add(self, keys: Sequence[str], args: Sequence[Arg], future: asyncio.Future[Any]) -> None:
        """Another caller's call: its keys and its section of the arguments."""
        self.sections.append((keys, args))
        self.keys += len(keys)
        self.args += len(args) + 1
        self.futures.append(future)

    def pack_into(self, out: list[bytes]) -> None:
        """One caller's call as it was made, or the joined form: the first caller's head,
        "*", then each call's section (its number of keys, its number of arguments, its
        arguments after the head)."""
        sections = self.sections
        alone = len(sections) == 1
        count = 3 + self.keys + (len(sections[0][1]) if alone else 2 + self.args)
        _evalsha(out, count, self.sha, self.keys)
        for keys, _ in sections:
            _append(out, keys)
        if alone:
            _append(out, sections[0][1])
            return
        _append(out, (sections[0][1][0],))
        out.append(_JOINED)
        for keys, args in sections:
            out.append(_number(len(keys)))
            out.append(_number(len(args) - 1))
            _append(out, args[1:])

    def done(self) -> bool:
        """Never: each caller's own future says whether it still waits."""
        return False

    def set_result(self, reply: Any) -> None:
        """Hand each caller its reply (a lone caller the whole reply)."""
        futures = self.futures
        if len(futures) == 1:
            if not futures[0].done():
                futures[0].set_result(reply)
            return
        if type(reply) is not list or len(reply) != len(futures):
            self.set_exception(InvalidResponse("a joined script call answered out of shape"))
            return
        for i, future in enumerate(futures):  # as long as `reply`, checked above
            one = reply[i]
            if not future.done():
                if isinstance(one, ResponseError):
                    future.set_exception(one)
                else:
                    future.set_result(one)

    def set_exception(self, error: BaseException) -> None:
        """The whole call failed: every caller hears it."""
        for future in self.futures:
            if not future.done():
                with contextlib.suppress(RuntimeError):  # its loop is closed; nobody waits
                    future.set_exception(error)


# What a connection's queue holds for each command written: its caller's future, or the
# callers of a shared call.
Waiter = asyncio.Future[Any] | _Shared


class _Connection(asyncio.Protocol):
    """One TCP connection: its own reader and its own queue of callers awaiting replies.

    A reply can only reach a caller whose command was written on this connection, in the
    order written: the queue lives and dies with the connection. When the connection
    fails (closed, reset, out of step, no progress within the timeout) every caller still
    in its queue gets a retriable connection error at once, and bytes that arrive later
    go nowhere.
    """

    def __init__(self, owner: Pipeline, loop: asyncio.AbstractEventLoop, generation: int) -> None:
        self.owner = owner
        self.loop = loop
        self.generation = generation
        self.reader = libvalkey.Reader(
            protocolError=InvalidResponse,
            replyError=parse_error,
            notEnoughData=_NOT_ENOUGH,
        )
        self.transport: asyncio.Transport | None = None
        self.inflight: deque[Waiter] = deque()
        # Extra seconds the head of the queue may take when it belongs to a large write.
        self.extra: dict[Waiter, float] = {}
        self.dead: Exception | None = None
        self.since = 0.0  # when the head of `inflight` became the head
        self._timer: asyncio.TimerHandle | None = None
        self._checked = -1.0  # `since` at the last overdue check (see `_check`)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport subclass (uvloop's).
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, futures: Sequence[Waiter]) -> None:
        """Write commands; their callers wait for replies in this order."""
        if self.dead is not None:
            raise self.dead
        assert self.transport is not None
        inflight = self.inflight
        if not inflight:
            self.since = self.loop.time()
        inflight.extend(futures)
        if len(data) > LARGE_WRITE:
            extra = len(data) / BYTES_PER_SECOND
            for future in futures:
                self.extra[future] = extra
        self.transport.write(data)
        if self._timer is None:
            self._arm()

    def data_received(self, data: bytes) -> None:
        if self.dead is not None:
            return  # the connection failed; its callers have their errors already
        self.reader.feed(data)
        inflight = self.inflight
        answered = False
        while True:
            try:
                reply = self.reader.gets()
            except InvalidResponse as exc:
                self.fail(exc)
                return
            if reply is _NOT_ENOUGH:
                break
            if not inflight:
                # Nothing on this connection waits for a reply: the stream is out of step.
                # The connection fails; no caller is ever handed this reply.
                self.fail(InvalidResponse("a reply from Valkey that no command waits for"))
                return
            future = inflight.popleft()
            answered = True
            if self.extra:
                self.extra.pop(future, None)
            if not future.done():
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        if answered:
            self.since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        error = ValkeyConnectionError(
            f"connection to {self.owner.host}:{self.owner.port} lost"
        )
        error.__cause__ = exc
        self.fail(error)

    def fail(self, error: Exception) -> None:
        """Close the connection; every caller still waiting on it gets `error`."""
        if self.dead is None:
            self.dead = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting = list(self.inflight)
        self.inflight.clear()
        self.extra.clear()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(RuntimeError):  # its event loop is already closed
                transport.abort()
        self.owner.lost(self)
        _fail(waiting, error)

    def _arm(self) -> None:
        self._timer = self.loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        head = self.inflight[0]
        return self.since + self.owner.timeout + (self.extra.get(head, 0.0) if self.extra else 0.0)

    def _check(self) -> None:
        # One timer per connection, moved forward lazily: replies only note the time.
        self._timer = None
        if self.dead is not None or not self.inflight:
            return
        due = self._due()
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._check)
            return
        if self._checked != self.since:
            # Overdue, but a blocked event loop looks the same: read what has arrived
            # first, and fail only if the head is still unanswered a moment later.
            self._checked = self.since
            self._timer = self.loop.call_later(GRACE, self._check)
            return
        owner = self.owner
        self.fail(ValkeyTimeoutError(f"Timeout reading from {owner.host}:{owner.port}"))


class Pipeline:
    """One auto-pipelined connection to a Valkey server (per event loop)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.25,
        connect_timeout: float = 0.25,
        batch: int = EARLY_WRITE,
    ) -> None:
        options = parse_url(url)
        self.host: str = options.get("host", "127.0.0.1")
        self.port: int = int(options.get("port", 6379))
        self.db: int = int(options.get("db", 0) or 0)
        self.username: str | None = options.get("username")
        self.password: str | None = options.get("password")
        self.tls = options.get("connection_class") is SSLConnection
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # Commands not yet written: they wait here until the end of the tick, and while a
        # connection is being made (nothing is written before its handshake completed).
        self.pending: list[tuple[bytes | _Joined | _Shared, Waiter]] = []
        self._conn: _Connection | None = None  # the ready connection, if any
        self._generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self.batch = batch
        self.writes = 0  # batches written, for tests and tuning
        self.commands = 0
        # Scripts (sha -> source) loaded on every new connection before anything else, so
        # an EVALSHA nobody awaits never meets NOSCRIPT after a connect or a server restart
        # (its retry would land behind commands queued after it).
        self.scripts: dict[str, str] = {}

    @property
    def generation(self) -> int:
        """How many connections this pipeline has opened (the current one's number)."""
        return self._generation

    def register(self, sha: str, source: str) -> None:
        """Load a script ahead of every later command, now and on each new connection."""
        if sha in self.scripts:
            return
        pin((sha,))
        self.scripts[sha] = source
        if self._conn is not None or self._connecting is not None:
            # A connection whose handshake has begun may not load it: queue it, in order.
            self.execute("SCRIPT", "LOAD", source).add_done_callback(_ignore_load)

    def execute(self, *args: Arg) -> asyncio.Future[Any]:
        """Queue one command; the future resolves to its reply (or its error)."""
        if args[0] in _GUARDED:
            _refuse_unpaired(args)
        loop = self._running()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue(pack(args), future, loop)
        return future

    def join(
        self, sha: str, keys: Sequence[str], args: Sequence[Arg], caller: object
    ) -> tuple[asyncio.Future[Any], list[object]]:
        """Queue a script call that may share one EVALSHA with the call queued just before.

        For scripts whose ops run one after another with nothing returned (`finish`): when
        the last queued command is a call of the same script, these keys and arguments are
        appended to it. Only the last queued command is joined, so commands still run in
        the order they were queued. Returns the call's future (one reply or error for
        every caller joined) and its callers so far: `caller` alone for a new call, so a
        caller learns it is the first and one callback can serve them all.
        """
        loop = self._running()
        last = self._joinable(_Joined, sha, len(args))
        if last is not None:
            assert type(last) is _Joined
            last.add(keys, args, caller)
            return cast(asyncio.Future[Any], self.pending[-1][1]), last.callers
        future = loop.create_future()
        joined = _Joined(sha, keys, args, caller)
        self._queue(joined, future, loop)
        return future, joined.callers

    def share(self, sha: str, keys: Sequence[str], args: Sequence[Arg]) -> asyncio.Future[Any]:
        """Queue a script call that may share one EVALSHA with the calls queued just before,
        each caller with a reply of its own (`state`).

        The script takes the joined form: its first argument common to every call (the
        first caller's is sent), then "*" and each call's section (its number of keys, its
        number of arguments, its arguments), and answers one reply per section in order. A
        lone call is sent as it was made. As with `join`, only the last queued command is
        joined, so commands still run in the order they were queued.
        """
        loop = self._running()
        future = loop.create_future()
        last = self._joinable(_Shared, sha, len(args) + 1)  # a section: 2 counts, no head
        if last is not None:
            assert type(last) is _Shared
            last.add(keys, args, future)
            return future
        shared = _Shared(sha, keys, args, future)
        self._queue(shared, shared, loop)
        return future

    def _joinable(self, kind: type, sha: str, more: int) -> _Joined | _Shared | None:
        """The last queued command, if it is a `kind` call of `sha` with room for `more`
        arguments (`JOIN_ARGS`)."""
        if not self.pending:
            return None
        last = self.pending[-1][0]
        if type(last) is not kind or isinstance(last, bytes):
            return None
        return last if last.sha == sha and last.args + more <= JOIN_ARGS else None

    def _queue(
        self, command: bytes | _Joined | _Shared, future: Waiter, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.pending.append((command, future))
        if len(self.pending) >= self.batch:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _running(self) -> asyncio.AbstractEventLoop:
        loop = _running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        return loop

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new event loop (a CLI call, a test's loop): the old connection and whatever
        # was queued belong to another loop and cannot be used from this one.
        self._drop(ValkeyConnectionError("event loop changed"))
        self._connecting = None
        self._loop = loop
        self._flush_scheduled = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self.pending:
            return
        conn = self._conn
        if conn is None:
            if self._connecting is None:
                assert self._loop is not None
                self._connecting = self._loop.create_task(self._connect())
            return
        batch, self.pending = self.pending, []
        out: list[bytes] = []
        for cmd, _ in batch:
            if isinstance(cmd, bytes):
                out.append(cmd)
            elif isinstance(cmd, _Shared):
                cmd.pack_into(out)
            else:
                cmd.pack_into(out)
        conn.send(b"".join(out), [f for _, f in batch])
        self.writes += 1
        self.commands += len(batch)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._generation += 1
        conn = _Connection(self, loop, self._generation)
        try:
            context = ssl.create_default_context() if self.tls else None
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: conn, self.host, self.port, ssl=context)
                await self._handshake(conn)
        except BaseException as exc:
            self._connecting = None
            error = ValkeyConnectionError(f"cannot connect to Valkey at {self.host}:{self.port}")
            error.__cause__ = exc
            conn.fail(error)
            if self._loop is loop:  # callers queued meanwhile on this loop: they heard no reply
                self._fail(self.pending, error)
                self.pending = []
            if not isinstance(exc, (OSError, TimeoutError, ValkeyError)):
                raise
            return
        self._connecting = None
        if conn.dead is None:
            self._conn = conn
        self._flush()

    async def _handshake(self, conn: _Connection) -> None:
        setup: list[tuple[Arg, ...]] = []
        if self.password is not None:
            setup.append(
                ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            )
        if self.db:
            setup.append(("SELECT", self.db))
        setup.extend(("SCRIPT", "LOAD", source) for source in self.scripts.values())
        if not setup:
            return
        futures = [conn.loop.create_future() for _ in setup]
        conn.send(b"".join(pack(cmd) for cmd in setup), futures)
        await asyncio.gather(*futures)

    def reset(self, error: Exception) -> None:
        """Fail every caller waiting on the current connection and drop it."""
        if self._conn is not None:
            self._conn.fail(error)

    def lost(self, conn: _Connection) -> None:
        """A connection failed (its own callers have their errors); forget it if current."""
        if conn is self._conn:
            self._conn = None
            if self.pending and not self._flush_scheduled and self._loop is not None:
                # Commands queued for it this tick go out on a new connection.
                self._flush_scheduled = True
                with contextlib.suppress(RuntimeError):  # its event loop is closed
                    self._loop.call_soon(self._flush)

    def _drop(self, error: Exception) -> None:
        # Everything of the current loop: the connection, its callers and queued commands.
        if self._conn is not None:
            self._conn.fail(error)
        self._conn = None
        pending, self.pending = self.pending, []
        self._fail(pending, error)

    @staticmethod
    def _fail(batch: list[tuple[bytes | _Joined | _Shared, Waiter]], error: Exception) -> None:
        _fail([f for _, f in batch], error)

    async def settle(self) -> None:
        """Wait until every command queued so far (on this loop) has its reply or error.

        Bounded: a connection without progress fails at the read timeout, one that cannot
        be made at the connect timeout.
        """
        loop = asyncio.get_running_loop()
        inflight = self._conn.inflight if self._conn is not None else ()
        queued = [
            f
            for waiter in (*(w for _, w in self.pending), *inflight)
            for f in (waiter.futures if isinstance(waiter, _Shared) else (waiter,))
        ]
        waiting = [f for f in queued if not f.done() and f.get_loop() is loop]
        if waiting:
            await asyncio.wait(waiting)

    async def close(self) -> None:
        """Close the connection; callers still waiting get a connection error."""
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
        self._drop(ValkeyConnectionError("pipeline closed"))


# Commands that answer with more or fewer replies than one, or change how the connection
# answers (CLIENT REPLY OFF, a RESP3 HELLO): one would shift every later reply onto the
# wrong caller. `execute` refuses them (upper- or lower-case names; CLIENT only as REPLY).
_UNPAIRED = (
    "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
    "MONITOR", "HELLO", "RESET", "QUIT", "SYNC", "PSYNC", "CLIENT",
)
_GUARDED: Final = frozenset((*_UNPAIRED, *(name.lower() for name in _UNPAIRED)))


def _refuse_unpaired(args: tuple[Arg, ...]) -> None:
    name = str(args[0]).upper()
    if name != "CLIENT" or (len(args) > 1 and str(args[1]).upper() == "REPLY"):
        raise ValueError(f"{name} does not answer with exactly one reply: not pipelined")


def _ignore_load(future: asyncio.Future[Any]) -> None:
    # A load that failed shows again as the script call's own error (NOSCRIPT, reloaded).
    if not future.cancelled():
        future.exception()


def _fail(futures: Sequence[Waiter], error: Exception) -> None:
    for future in futures:
        if not future.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed; nobody waits
                future.set_exception(error)
