"""Watch the policy files and swap the engine's chains when they change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .binding import Engine

log = logging.getLogger("policyroute.reload")


class Reloader:
    """Background task: watch the policy paths, then `engine.reload()` off the request path."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0
        self.targets = [str(Path(p).resolve()) for p in engine.paths]

    async def start(self) -> None:
        """Begin watching."""
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._watch(), name="policyroute-reloader")

    async def _watch(self) -> None:
        from watchfiles import awatch

        targets = self.targets
        async for changes in awatch(*targets, stop_event=self._stop, debounce=50, step=20):
            if not any(p.endswith((".yaml", ".yml")) for _, p in changes):
                continue
            # Parsing and compiling are CPU work; keep them off the event loop.
            error = await asyncio.to_thread(self.engine.reload)
            self.reloads += 1
            if error is None:
                log.info("policyroute: policies reloaded")

    async def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
