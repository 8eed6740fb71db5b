"""Valkey access for steps: Lua scripts loaded once, keys with hash tags, typed errors."""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Sequence
from typing import Any, Protocol

import valkey.asyncio as avalkey
from valkey.asyncio.cluster import ValkeyCluster
from valkey.exceptions import NoScriptError, ValkeyError

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
            call = self.pipeline.execute
            try:
                return await call("EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:  # a restarted or flushed server: load once, call again
                await call("SCRIPT", "LOAD", source)
                return await call("EVALSHA", sha, len(keys), *keys, *args)
        except (ValkeyError, OSError, TimeoutError) as exc:
            raise StorageError("valkey", operation, fail_open, exc) from exc

    def _source(self, name: str) -> tuple[str, str]:
        found = self._sources.get(name)
        if found is None:
            source = lua_source(name)
            found = (hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest(), source)
            self._sources[name] = found
        return found

    async def command(self, *args: Arg, operation: str, fail_open: bool = False) -> Any:
        """Run one plain command with the same error wrapping."""
        try:
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
        """Close every connection."""
        if self.pipeline is not None:
            await self.pipeline.close()
        await self.client.aclose()
