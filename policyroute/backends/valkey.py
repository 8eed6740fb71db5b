"""Valkey access for steps: Lua scripts loaded once, keys with hash tags, typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib.resources
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import valkey as svalkey
import valkey.asyncio as avalkey
import valkey.cluster as svalkey_cluster
from valkey.asyncio.cluster import ValkeyCluster
from valkey.exceptions import NoScriptError, ResponseError, ValkeyError

from ..errors import StorageError
from .clock import ASK_SERVER, ServerClock
from .keys import TAG_MEMO, TAG_MEMO_LONGEST
from .pipeline import Pipeline, remember

Arg = str | bytes | int | float


class Store(Protocol):
    """What steps may ask of the state backend."""

    prefix: str
    cluster: bool
    # True when `run` queues its command before its first await (so a cancelled caller's
    # command is still sent): the auto-pipelined single-server store.
    queues_first: bool

    def key(self, tag: str, *parts: str) -> str:
        """A namespaced key whose hash tag is `tag` (keys of one tag share a cluster slot)."""
        ...

    async def run(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        *,
        operation: str,
        fail_open: bool,
        shares: bool = False,
    ) -> Any:
        """Run a packaged Lua script by name; raise StorageError on any backend failure.

        `shares`: the script takes the joined form (see `Pipeline.share`): concurrent calls
        may share one call to the server, each answered on its own.
        """
        ...

    def submit(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        *,
        operation: str,
        on_error: Callable[[StorageError], None],
        joins: bool = False,
    ) -> None:
        """Queue a script call nobody awaits (when `queues_first`); errors go to `on_error`."""
        ...

    def now(self) -> int | str:
        """Valkey's time in ms for a script's `now` argument, or "" for the script to ask."""
        ...

    def run_now(
        self, script: str, keys: Sequence[str], args: Sequence[Arg], operation: str, timeout: float
    ) -> Any:
        """`run` on a blocking connection of its own, without an event loop (at exit)."""
        ...


# Key names remembered (`ValkeyStore.key`); past this many the memo starts again.
KEY_MEMO = TAG_MEMO
KEY_MEMO_TAG: Final = TAG_MEMO_LONGEST  # a longer tag (a very long account name) is not kept

# Submitted calls waiting to be sent again at most (past it, a failure is given up at once),
# and the longest wait between two tries (the first is RETRY_FIRST, doubling).
RETRY_LIMIT = 10_000
RETRY_FIRST: Final = 0.05
_partial: Final = functools.partial  # per call: bound once
RETRY_MAX = 1.0


class _Call:
    """A submitted script call: what to send again, and whom to tell if it is given up."""

    __slots__ = ("args", "deadline", "delay", "keys", "on_error", "operation", "reloaded",
                 "sha", "source")  # fmt: skip

    # Made on every submitted call: a plain class, whose `__init__` the compiled build runs
    # natively (a dataclass's generated one would be interpreted).
    def __init__(
        self,
        sha: str,
        source: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        operation: str,
        on_error: Callable[[StorageError], None],
    ) -> None:
        self.sha = sha
        self.source = source
        self.keys = keys
        self.args = args
        self.operation = operation
        self.on_error = on_error
        self.reloaded = False  # sent again after NOSCRIPT, or alone after a joined call failed
        self.deadline = 0.0  # set at the first failure: then + retry_for
        self.delay = RETRY_FIRST


def lua_source(name: str) -> str:
    """The text of `policyroute/backends/lua/<name>.lua`, with the files it includes prepended.

    A line `-- include: NAME` pulls in `NAME.lua` (shared local functions) once, before
    the script: scripts cannot load one another on the server.
    """
    folder = importlib.resources.files("policyroute.backends.lua")
    text = folder.joinpath(f"{name}.lua").read_text()
    shared = [
        folder.joinpath(f"{line.split(':', 1)[1].strip()}.lua").read_text()
        for line in text.splitlines()
        if line.startswith("-- include:")
    ]
    return "\n".join([*shared, text])


def _escape_tag(tag: str) -> str:
    # Braces inside a tag would end it early and spread one request's keys over slots.
    # Percent-encoded, so no two tags share a key ('a{b' and 'a(b' once did).
    if "{" not in tag and "}" not in tag and "%" not in tag:
        return tag
    return tag.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


class ValkeyStore:
    """A Valkey (or Valkey cluster) connection with the package's Lua scripts."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "pr",
        cluster: bool = False,
        timeout: float = 0.25,
        max_connections: int = 64,
        retry_for: float = 30.0,
        stop_wait: float = 2.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.cluster = cluster
        kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if cluster:
            self.client: Any = ValkeyCluster.from_url(url, **kwargs)
        else:
            self.client = avalkey.from_url(  # type: ignore[no-untyped-call]
                url, max_connections=max_connections, **kwargs
            )
        self._scripts: dict[str, Any] = {}
        self._keys: dict[tuple[str, ...], str] = {}
        self._sources: dict[str, tuple[str, str]] = {}
        # Script calls (the per-request hot path) are auto-pipelined on one connection;
        # a cluster routes each call by slot through the cluster client instead.
        self.pipeline: Pipeline | None = (
            None if cluster else Pipeline(url, timeout=timeout, connect_timeout=timeout)
        )
        self.queues_first = self.pipeline is not None
        # Valkey's time read off this process's clock (`backends/clock.py`); a cluster's
        # scripts read their own node's clock, as each key's node is its time.
        self.clock: ServerClock | None = (
            ServerClock(self._ask_time) if self.pipeline is not None else None
        )
        self._retries: set[asyncio.Future[Any]] = set()
        self.retry_for = retry_for
        self.stop_wait = stop_wait
        self._closing = False
        self._closed_future: asyncio.Future[None] | None = None

    @property
    def _closed(self) -> asyncio.Future[None]:
        # Done once stop() began: retries waiting out their backoff go at once.
        loop = asyncio.get_running_loop()
        if self._closed_future is None or self._closed_future.get_loop() is not loop:
            self._closed_future = loop.create_future()
            if self._closing:
                self._closed_future.set_result(None)
        return self._closed_future

    def key(self, tag: str, *parts: str) -> str:
        """`<prefix>:{<tag>}:<part>:...`; the tag is a cluster hash tag."""
        # Requests of one caller on one route ask for the same keys: one lookup, not a join.
        # Only short tags are remembered, so the memo's size is bounded in bytes too.
        if len(tag) > KEY_MEMO_TAG:
            return ":".join((self.prefix, "{" + _escape_tag(tag) + "}", *parts))
        memo = (tag, *parts)
        found = self._keys.get(memo)
        if found is None:
            if len(self._keys) >= KEY_MEMO:
                self._keys.clear()  # many callers: start again rather than grow
            found = self._keys[memo] = ":".join((self.prefix, "{" + _escape_tag(tag) + "}", *parts))
            remember(found)  # sent with many calls: its RESP made once too
        return found

    def now(self) -> int | str:
        """Valkey's time in ms for a script's `now` argument, or "" for the script to ask."""
        clock = self.clock
        return ASK_SERVER if clock is None else clock.now()

    def _ask_time(self) -> asyncio.Future[Any]:
        assert self.pipeline is not None
        return self.pipeline.execute("TIME")

    def _script(self, name: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self.client.register_script(lua_source(name))
            self._scripts[name] = script
        return script

    async def run(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        *,
        operation: str,
        fail_open: bool,
        shares: bool = False,
    ) -> Any:
        """EVALSHA the named script (reloaded transparently after NOSCRIPT).

        `shares`: the script takes the joined form (`Pipeline.share`), so calls made in
        the same tick may go as one EVALSHA, each with its own reply.
        """
        try:
            if self.pipeline is None:
                return await self._script(script)(keys=list(keys), args=list(args))
            sha, source = self._source(script)
            try:
                if shares:
                    return await self.pipeline.share(sha, keys, args)
                return await self.pipeline.execute("EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:  # a flushed server: load once, call again (below: no
                pass  # await inside a handler, see `_compiled.py`)
            return await self._reload_and_call(source, ("EVALSHA", sha, len(keys), *keys, *args))
        except (ValkeyError, OSError, TimeoutError) as exc:
            raise StorageError("valkey", operation, fail_open, exc) from exc

    def run_now(
        self, script: str, keys: Sequence[str], args: Sequence[Arg], operation: str, timeout: float
    ) -> Any:
        """`run` on a blocking connection of its own, without an event loop (at exit).

        Bounded by `timeout` per connect and per reply; raises StorageError.
        """
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        try:
            if self.cluster:
                client: Any = svalkey_cluster.ValkeyCluster.from_url(  # type: ignore[no-untyped-call]
                    self.url, **options
                )
            else:
                client = svalkey.Valkey.from_url(self.url, **options)
            try:
                return client.register_script(lua_source(script))(keys=list(keys), args=list(args))
            finally:
                client.close()
        except (ValkeyError, OSError, TimeoutError) as exc:
            raise StorageError("valkey", operation, False, exc) from exc

    async def _reload_and_call(self, source: str, command: tuple[Arg, ...]) -> Any:
        assert self.pipeline is not None
        await self.pipeline.execute("SCRIPT", "LOAD", source)
        return await self.pipeline.execute(*command)

    def submit(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        *,
        operation: str,
        on_error: Callable[[StorageError], None],
        joins: bool = False,
    ) -> None:
        """Queue a script call nobody awaits (only when `queues_first`); failures go to `on_error`.

        The caller goes on at once: no await, no task. Commands after it on this store
        (`run`, `command`, `stop`) are sent after it on the same connection, so they see
        what it wrote. With `joins` (a script of independent ops run in sequence, such as
        `finish`) it may share one EVALSHA with the call submitted just before it.

        A call that meets no server (a stalled, restarting or unreachable Valkey) is sent
        again with backoff for up to `retry_for` seconds, so a fault shorter than that
        loses no commit, refund or release (the submitted scripts' ops are safe to run
        twice); `on_error` hears of it only when it is given up.
        """
        assert self.pipeline is not None
        sha, source = self._source(script)
        call = _Call(sha, source, keys, args, operation, on_error)
        if joins:
            future, callers = self.pipeline.join(sha, keys, args, call)
            if len(callers) == 1:  # the call's first caller: one callback serves every caller
                future.add_done_callback(_partial(self._joined, callers))
            return
        self._send(call).add_done_callback(_partial(self._settled, call, False))

    def _send(self, call: _Call) -> asyncio.Future[Any]:
        assert self.pipeline is not None
        return self.pipeline.execute("EVALSHA", call.sha, len(call.keys), *call.keys, *call.args)

    def _joined(self, callers: list[Any], future: asyncio.Future[Any]) -> None:
        # A joined call's reply: nothing to do on success; on failure each caller in turn.
        if future.cancelled() or future.exception() is None:
            return
        for call in callers:
            self._settled(call, True, future)

    def _settled(self, call: _Call, joined: bool, future: asyncio.Future[Any]) -> None:
        self._retries.discard(future)
        if future.cancelled() or (exc := future.exception()) is None:
            return
        if isinstance(exc, NoScriptError) and not call.reloaded:
            call.reloaded = True  # load, send again (once)
            command = ("EVALSHA", call.sha, len(call.keys), *call.keys, *call.args)
            self._track(call, asyncio.ensure_future(self._reload_and_call(call.source, command)))
        elif isinstance(exc, ResponseError) and joined:
            # A script error in one caller's ops stopped a joined call part way: each caller
            # sends its own ops alone (joined scripts' ops may run twice), so one bad key
            # costs no other request its commit, refund or release.
            call.reloaded = True
            self._track(call, self._send(call))
        elif not isinstance(exc, ResponseError) and self._may_retry(call):
            self._track(call, asyncio.ensure_future(self._later(call)))
        else:
            call.on_error(StorageError("valkey", call.operation, True, exc))

    def _may_retry(self, call: _Call) -> bool:
        now = time.monotonic()
        if call.deadline == 0.0:
            call.deadline = now + self.retry_for
        return not self._closing and now < call.deadline and len(self._retries) < RETRY_LIMIT

    async def _later(self, call: _Call) -> Any:
        # The next try of a call that met no server; stop() cuts the wait short.
        delay, call.delay = call.delay, min(call.delay * 2, RETRY_MAX)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._closed), delay)
        return await self._send(call)

    def _track(self, call: _Call, future: asyncio.Future[Any]) -> None:
        self._retries.add(future)
        future.add_done_callback(_partial(self._settled, call, False))

    async def settle(self) -> None:
        """Wait until every call submitted so far has its reply, or has been given up."""
        if self.pipeline is not None:
            await self.pipeline.settle()
        while self._retries:
            await asyncio.wait(list(self._retries))

    def _source(self, name: str) -> tuple[str, str]:
        found = self._sources.get(name)
        if found is None:
            source = lua_source(name)
            found = (hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest(), source)
            self._sources[name] = found
            if self.pipeline is not None:
                self.pipeline.register(*found)
        return found

    async def command(self, *args: Arg, operation: str, fail_open: bool = False) -> Any:
        """Run one plain command with the same error wrapping.

        On one server it goes down the pipelined connection, behind every script call
        already queued (submitted after-handler calls included), so it sees their writes.
        """
        try:
            if self.pipeline is not None:
                return await self.pipeline.execute(*args)
            return await self.client.execute_command(*args)
        except (ValkeyError, OSError, TimeoutError) as exc:
            raise StorageError("valkey", operation, fail_open, exc) from exc

    async def ping(self) -> bool:
        """True when Valkey answers."""
        try:
            return bool(await self.client.ping())
        except (ValkeyError, OSError, TimeoutError):
            return False

    async def stop(self) -> None:
        """Close every connection, once the calls submitted so far have their replies.

        Calls waiting to be sent again get one last try at once; whatever has no reply
        within `stop_wait` seconds is given up (its `on_error` is told), so a process
        stops in bounded time even while Valkey is away.
        """
        if self.pipeline is not None:
            self._closing = True
            closed = self._closed
            if not closed.done():
                closed.set_result(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.settle(), self.stop_wait)
            await self.pipeline.close()
        await self.client.aclose()
