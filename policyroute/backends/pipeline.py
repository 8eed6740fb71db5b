"""Auto-pipelining: commands issued in one event-loop tick share writes on one connection.

Concurrent requests each need one script call before their handler. Sent one by one
through a connection pool, each call pays a pool checkout, a write syscall and a read
wake-up. Here commands queue until the end of the current tick, go out as one write on
one connection, and replies are matched to callers in order as they are parsed
(libvalkey's reader, fed from an asyncio protocol: no task per read). A batch that gets
no full reply within the timeout fails every caller still waiting and resets the
connection, so a late reply can never be matched to the wrong caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import libvalkey
from valkey.asyncio.connection import SSLConnection, parse_url
from valkey.exceptions import ConnectionError as ValkeyConnectionError
from valkey.exceptions import InvalidResponse, NoScriptError, ResponseError
from valkey.exceptions import TimeoutError as ValkeyTimeoutError

Arg = str | bytes | int | float

_NOT_ENOUGH = object()

# A batch leaves at the end of the event-loop tick, or as soon as this many commands wait
# (a bound on the batch under very many concurrent requests). Each write is a syscall of
# ~17 µs on loopback, so fewer, larger writes cost less CPU: the full chain's server CPU per
# request was 286 µs at 8, 281 at 16 and 32, 271 at 1000 (paired runs of 8 rounds, bare
# 191 µs); 4 was worse still (310 against 287).
EARLY_WRITE = 32

# Arguments one joined script call may carry (`Pipeline.join`): a bound on the time one
# call holds the server.
JOIN_ARGS = 512


def parse_error(text: str) -> ResponseError:
    """The exception for an error reply (NOSCRIPT gets its own class)."""
    code, _, rest = text.partition(" ")
    return NoScriptError(rest) if code == "NOSCRIPT" else ResponseError(text)


def pack(args: tuple[Arg, ...]) -> bytes:
    """One command in RESP: an array of bulk strings (libvalkey's C packer)."""
    try:
        return libvalkey.pack_command(args)
    except TypeError:  # a type the C packer refuses (a bool): spell it out here
        return _pack(args)


def _pack(args: Sequence[Arg]) -> bytes:
    parts = [
        a
        if type(a) is bytes
        else a.encode()
        if type(a) is str
        else (repr(a) if type(a) is float else str(int(a))).encode()
        for a in args
    ]
    return b"*%d\r\n" % len(parts) + b"".join([b"$%d\r\n%b\r\n" % (len(p), p) for p in parts])


class _Joined:
    """Calls of one script whose ops run in sequence, sent as one EVALSHA (`Pipeline.join`)."""

    __slots__ = ("args", "callers", "keys", "sha")

    def __init__(self, sha: str, keys: Sequence[str], args: Sequence[Arg], caller: object) -> None:
        self.sha = sha
        self.keys = list(keys)
        self.args = list(args)
        self.callers = [caller]

    def pack(self) -> bytes:
        """The one EVALSHA that runs every joined call's ops in order."""
        return pack(("EVALSHA", self.sha, len(self.keys), *self.keys, *self.args))


class _Protocol(asyncio.Protocol):
    """Feeds bytes to the reader and resolves waiting callers in order."""

    def __init__(self, owner: Pipeline) -> None:
        self.owner = owner
        self.reader = libvalkey.Reader(
            protocolError=InvalidResponse,
            replyError=parse_error,
            notEnoughData=_NOT_ENOUGH,
        )
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport subclass (uvloop's).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        inflight = self.owner.inflight
        while True:
            try:
                reply = self.reader.gets()
            except InvalidResponse as exc:
                self.owner.reset(exc)
                return
            if reply is _NOT_ENOUGH:
                return
            if not inflight:
                # A reply nobody waits for: the stream is out of step; start over.
                self.owner.reset(InvalidResponse("unexpected reply from Valkey"))
                return
            future = inflight.popleft()
            if not future.done():
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.lost(self, exc)


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
        self.pending: list[tuple[bytes | _Joined, asyncio.Future[Any]]] = []
        self.inflight: deque[asyncio.Future[Any]] = deque()
        self._protocol: _Protocol | None = None
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

    def register(self, sha: str, source: str) -> None:
        """Load a script ahead of every later command, now and on each new connection."""
        if sha in self.scripts:
            return
        self.scripts[sha] = source
        if self._protocol is not None:  # connected (or connecting): queue it now, in order
            self.execute("SCRIPT", "LOAD", source).add_done_callback(_ignore_load)

    def execute(self, *args: Arg) -> asyncio.Future[Any]:
        """Queue one command; the future resolves to its reply (or its error)."""
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
        if self.pending:
            last, future = self.pending[-1]
            if (
                type(last) is _Joined
                and last.sha == sha
                and len(last.args) + len(args) <= JOIN_ARGS
            ):
                last.keys.extend(keys)
                last.args.extend(args)
                last.callers.append(caller)
                return future, last.callers
        future = loop.create_future()
        joined = _Joined(sha, keys, args, caller)
        self._queue(joined, future, loop)
        return future, joined.callers

    def _queue(
        self, command: bytes | _Joined, future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.pending.append((command, future))
        if len(self.pending) >= self.batch:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _running(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._rebind(loop)
        return loop

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new event loop (a CLI call, a test's loop): the old connection belongs to
        # another loop and cannot be used from this one.
        self._drop(ValkeyConnectionError("event loop changed"))
        self._loop = loop
        self._flush_scheduled = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self.pending:
            return
        protocol = self._protocol
        if protocol is None or protocol.closed or protocol.transport is None:
            if self._connecting is None:
                assert self._loop is not None
                self._connecting = self._loop.create_task(self._connect())
            return
        batch, self.pending = self.pending, []
        futures = [f for _, f in batch]
        self.inflight.extend(futures)
        protocol.transport.write(
            b"".join([cmd if isinstance(cmd, bytes) else cmd.pack() for cmd, _ in batch])
        )
        self.writes += 1
        self.commands += len(batch)
        assert self._loop is not None
        self._loop.call_later(self.timeout, self._expire, protocol, futures[-1])

    def _expire(self, protocol: _Protocol, last: asyncio.Future[Any]) -> None:
        if not last.done() and protocol is self._protocol:
            self.reset(ValkeyTimeoutError(f"Timeout reading from {self.host}:{self.port}"))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        protocol = _Protocol(self)
        try:
            context = ssl.create_default_context() if self.tls else None
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: protocol, self.host, self.port, ssl=context)
                self._protocol = protocol
                await self._handshake(protocol)
        except (OSError, TimeoutError, ResponseError) as exc:
            self._connecting = None
            if protocol.transport is not None:
                protocol.transport.abort()
            self._protocol = None
            error = ValkeyConnectionError(f"cannot connect to Valkey at {self.host}:{self.port}")
            error.__cause__ = exc
            self._fail(self.pending, error)
            self.pending = []
            return
        self._connecting = None
        self._flush()

    async def _handshake(self, protocol: _Protocol) -> None:
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
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in setup]
        self.inflight.extend(futures)
        protocol.transport.write(b"".join(pack(cmd) for cmd in setup))
        for future in futures:
            await future

    def reset(self, error: Exception) -> None:
        """Fail every waiting caller and drop the connection (it is out of step)."""
        self._drop(error)

    def lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        """The connection closed: callers still waiting get a connection error."""
        if protocol is self._protocol:
            error = ValkeyConnectionError(f"connection to {self.host}:{self.port} lost")
            error.__cause__ = exc
            self._drop(error)

    def _drop(self, error: Exception) -> None:
        protocol, self._protocol = self._protocol, None
        waiting = list(self.inflight)
        self.inflight.clear()
        if protocol is not None and protocol.transport is not None and not protocol.closed:
            with contextlib.suppress(RuntimeError):  # its event loop is already closed
                protocol.transport.abort()
        _fail(waiting, error)

    @staticmethod
    def _fail(batch: list[tuple[bytes | _Joined, asyncio.Future[Any]]], error: Exception) -> None:
        _fail([f for _, f in batch], error)

    async def settle(self) -> None:
        """Wait until every command queued so far (on this loop) has its reply or error.

        Bounded: a batch without its reply fails at the read timeout, a connection that
        cannot be made at the connect timeout.
        """
        loop = asyncio.get_running_loop()
        queued = (*(f for _, f in self.pending), *self.inflight)
        waiting = [f for f in queued if not f.done() and f.get_loop() is loop]
        if waiting:
            await asyncio.wait(waiting)

    async def close(self) -> None:
        """Close the connection; callers still waiting get a connection error."""
        self._drop(ValkeyConnectionError("pipeline closed"))
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None


def _ignore_load(future: asyncio.Future[Any]) -> None:
    # A load that failed shows again as the script call's own error (NOSCRIPT, reloaded).
    if not future.cancelled():
        future.exception()


def _fail(futures: Sequence[asyncio.Future[Any]], error: Exception) -> None:
    for future in futures:
        if not future.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed; nobody waits
                future.set_exception(error)
