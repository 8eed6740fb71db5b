"""Valkey access for steps: Lua scripts loaded once, keys with hash tags, typed errors."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.resources
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import valkey.asyncio as avalkey
from valkey.asyncio.cluster import ValkeyCluster
from valkey.exceptions import NoScriptError, ResponseError, ValkeyError

from ..errors import StorageError
from .pipeline import Pipeline

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
    ) -> Any:
        """Run a packaged Lua script by name; raise StorageError on any backend failure."""
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


def lua_source(name: str) -> str:
    """The text of `policyroute/lua/<name>.lua`, with the files it includes prepended.

    A line `-- include: NAME` pulls in `NAME.lua` (shared local functions) once, before
    the script: scripts cannot load one another on the server.
    """
    folder = importlib.resources.files("policyroute.lua")
    text = folder.joinpath(f"{name}.lua").read_text()
    shared = [
        folder.joinpath(f"{line.split(':', 1)[1].strip()}.lua").read_text()
        for line in text.splitlines()
        if line.startswith("-- include:")
    ]
    return "\n".join([*shared, text])


def _escape_tag(tag: str) -> str:
    # Braces inside a tag would end it early and spread one request's keys over slots.
    return tag.replace("{", "(").replace("}", ")")


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
        self._sources: dict[str, tuple[str, str]] = {}
        # Script calls (the per-request hot path) are auto-pipelined on one connection;
        # a cluster routes each call by slot through the cluster client instead.
        self.pipeline: Pipeline | None = (
            None if cluster else Pipeline(url, timeout=timeout, connect_timeout=timeout)
        )
        self.queues_first = self.pipeline is not None
        self._retries: set[asyncio.Future[Any]] = set()

    def key(self, tag: str, *parts: str) -> str:
        """`<prefix>:{<tag>}:<part>:...`; the tag is a cluster hash tag."""
        return ":".join((self.prefix, "{" + _escape_tag(tag) + "}", *parts))

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
    ) -> Any:
        """EVALSHA the named script (reloaded transparently after NOSCRIPT)."""
        try:
            if self.pipeline is None:
                return await self._script(script)(keys=list(keys), args=list(args))
            sha, source = self._source(script)
            try:
                return await self.pipeline.execute("EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:  # a flushed server: load once, call again
                command = ("EVALSHA", sha, len(keys), *keys, *args)
                return await self._reload_and_call(source, command)
        except (ValkeyError, OSError, TimeoutError) as exc:
            raise StorageError("valkey", operation, fail_open, exc) from exc

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
        """
        assert self.pipeline is not None
        sha, source = self._source(script)
        if joins:
            future, callers = self.pipeline.join(sha, keys, args, (keys, args, operation, on_error))
            if len(callers) == 1:  # the call's first caller: one callback serves every caller
                future.add_done_callback(functools.partial(self._joined, source, sha, callers))
            return
        future = self.pipeline.execute("EVALSHA", sha, len(keys), *keys, *args)
        future.add_done_callback(
            functools.partial(
                self._submitted, source, False, sha, keys, args, operation, on_error
            )
        )

    def _joined(
        self, source: str, sha: str, callers: list[Any], future: asyncio.Future[Any]
    ) -> None:
        # A joined call's reply: nothing to do on success; on failure each caller in turn.
        if future.cancelled() or future.exception() is None:
            return
        for keys, args, operation, on_error in callers:
            self._submitted(source, True, sha, keys, args, operation, on_error, future)

    def _submitted(
        self,
        source: str | None,
        joined: bool,
        sha: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        operation: str,
        on_error: Callable[[StorageError], None],
        future: asyncio.Future[Any],
    ) -> None:
        # `source` is None for a call sent again: it is not sent a third time.
        self._retries.discard(future)
        if future.cancelled() or (exc := future.exception()) is None:
            return
        if source is not None and isinstance(exc, ResponseError):
            command = ("EVALSHA", sha, len(keys), *keys, *args)
            retry: asyncio.Future[Any]
            if isinstance(exc, NoScriptError):  # load, send again
                retry = asyncio.ensure_future(self._reload_and_call(source, command))
            elif joined:
                # A script error in one caller's ops stopped a joined call part way: each
                # caller sends its own ops alone (joined scripts' ops may run twice), so
                # one bad key costs no other request its commit, refund or release.
                assert self.pipeline is not None
                retry = self.pipeline.execute(*command)
            else:
                on_error(StorageError("valkey", operation, True, exc))
                return
            self._retries.add(retry)
            retry.add_done_callback(
                functools.partial(
                    self._submitted, None, False, sha, keys, args, operation, on_error
                )
            )
            return
        on_error(StorageError("valkey", operation, True, exc))

    async def settle(self) -> None:
        """Wait until every call submitted so far has its reply (or its error)."""
        if self.pipeline is not None:
            await self.pipeline.settle()
        if self._retries:
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
        """Close every connection, once the calls submitted so far have their replies."""
        if self.pipeline is not None:
            await self.settle()
            await self.pipeline.close()
        await self.client.aclose()
