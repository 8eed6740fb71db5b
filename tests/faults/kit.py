"""Shared pieces of the fault tests: server processes to pause and kill, faults by name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from policyroute.backends.embedded import EmbeddedPulsar, EmbeddedValkey

from .proxy import FaultProxy

# Every fault lasts this long (a GC pause, a slow fsync, a stalled link look the same).
HOLD = 0.6
# Within this long after a fault ends, everything serves normally again.
RECOVERY = 2.0


def broker_pid(broker: EmbeddedPulsar) -> int:
    """The process id of a pulsar-lite broker."""
    from pulsar_lite.process_manager import process_manager

    process, _, _ = process_manager._processes[str(broker.handle.db_path)]
    return int(process.pid)


def freeze(pid: int) -> None:
    """SIGSTOP: the process holds its sockets and answers nothing."""
    os.kill(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    """SIGCONT (harmless when the process is running or gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


@dataclass(frozen=True)
class Fault:
    """A named fault: `run()` brings it on, holds it, and ends it (returns once healed)."""

    name: str
    run: Callable[[], Awaitable[None]]


def valkey_faults(server: EmbeddedValkey, proxy: FaultProxy) -> dict[str, Fault]:
    """Every fault of a Valkey server (paused, killed) and of the link to it (the proxy)."""

    async def held(start: Callable[[], None], end: Callable[[], None], hold: float = HOLD) -> None:
        start()
        try:
            await asyncio.sleep(hold)
        finally:
            end()

    async def sigstop() -> None:
        pid = server.pid
        await held(lambda: freeze(pid), lambda: thaw(pid))

    async def sigkill() -> None:
        # Killed, away for a while, back on its port empty (no persistence).
        os.kill(server.pid, signal.SIGKILL)
        await asyncio.sleep(HOLD / 2)
        await asyncio.to_thread(server.stop)  # reaps the killed process
        await asyncio.to_thread(server.restart)

    async def pause() -> None:
        await held(proxy.pause, proxy.heal)

    async def delay() -> None:
        # 0.2 s each way: a round trip takes longer than the store's 0.25 s read timeout.
        await held(lambda: proxy.delay(0.2), proxy.heal)

    async def blackhole() -> None:
        await held(proxy.blackhole, proxy.heal)

    async def reset_mid_reply() -> None:
        # Every connection (reconnects too) is cut with an RST 5 bytes into a reply.
        await held(lambda: proxy.reset(after=5, every=True), proxy.heal, HOLD / 2)

    async def drop() -> None:
        await held(proxy.drop, proxy.heal, 0.05)

    async def half_close() -> None:
        await held(proxy.half_close, proxy.heal, 0.05)

    found = [
        Fault("sigstop", sigstop),
        Fault("sigkill-restart", sigkill),
        Fault("pause", pause),
        Fault("delay", delay),
        Fault("blackhole", blackhole),
        Fault("reset-mid-reply", reset_mid_reply),
        Fault("drop", drop),
        Fault("half-close", half_close),
    ]
    return {f.name: f for f in found}
