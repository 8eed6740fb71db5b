"""A loopback TCP proxy whose faults the tests control: pause, delay, drop, reset, blackhole.

```python
with FaultProxy("127.0.0.1", valkey.port) as proxy:
    store = ValkeyStore(proxy.url("redis", "/0"))
    proxy.pause()        # nothing moves either way; connections stay open, bytes wait
    proxy.resume()       # the waiting bytes go on, in order
    proxy.reset(after=7) # RST once 7 more bytes of the server's reply reached the client
    proxy.heal()         # every fault off
```

The proxy runs its own event loop in a daemon thread. Every control method is a plain,
thread-safe call that returns once the fault is in force, so a sync test and an async
test (on any event loop) use it the same way; from an async test it blocks for well
under a millisecond.

Faults and what each connection sees:

- `pause()` / `resume()`: forwarding stops in both directions. Connections stay open,
  new ones are accepted and connected upstream, and what either side sends waits (in
  the proxy and in the kernel's buffers) until `resume()` forwards it in order: a server
  stopped with SIGSTOP, as its clients see it.
- `delay(seconds)`: each chunk waits that long before it is forwarded (per direction,
  in order; a round trip pays it twice). `delay(0)` ends it.
- `drop()`: every open connection is closed cleanly (FIN to both ends); new ones work.
- `reset(after=None)`: every open connection is aborted with an RST to both ends
  (SO_LINGER 0, then close). With `after=N`, each stays up until N more bytes of the
  server's reply have been forwarded to the client, then is reset: cut mid-reply. With
  `every=True`, connections opened later get the same treatment until `heal()`.
- `half_close()`: the write side toward the client of every open connection is shut
  (the client reads EOF); what the server sends on it afterwards is discarded, what the
  client sends still reaches the server.
- `blackhole()`: open connections and new ones are read but nothing is forwarded or
  answered (new ones are not even connected upstream); the bytes are gone. `heal()`
  resets the blackholed connections: their streams have holes.
- `heal()`: every fault off (a pause resumes, the delay is zero, armed resets disarmed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

CHUNK = 65536
CONTROL_TIMEOUT = 5.0


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection (None while blackholed)."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    reply_budget: int | None = None  # reset once this many more reply bytes went through
    half_closed: bool = False
    blackholed: bool = False
    dead: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


def _rst(writer: asyncio.StreamWriter) -> None:
    """Abort a connection with an RST (SO_LINGER 0), not a FIN."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 (a free port) in front of `target_host:target_port`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self.to_server = 0  # bytes forwarded toward the server
        self.to_client = 0  # bytes forwarded toward the client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing: asyncio.Event | None = None  # set unless paused
        self._delay = 0.0
        self._blackhole = False
        self._reset_every: int | None = None  # the `after` of `reset(every=True)`

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen on a free loopback port (returns when it accepts connections)."""
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        loop = asyncio.SelectorEventLoop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._listen(ready))
            except BaseException as exc:
                ready.set_exception(exc)
                return
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-proxy->{self.target}", daemon=True)
        self._thread.start()
        self.port = ready.result(CONTROL_TIMEOUT)
        return self

    def close(self) -> None:
        """Stop listening and abort every connection."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CONTROL_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def url(self, scheme: str, suffix: str = "") -> str:
        """`scheme://127.0.0.1:<port><suffix>`, e.g. `url("redis", "/0")`."""
        return f"{scheme}://127.0.0.1:{self.port}{suffix}"

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return len(self._links)

    # -- faults ----------------------------------------------------------------------

    def pause(self) -> None:
        """Stop forwarding both ways; connections stay open and bytes wait for `resume`."""
        self._apply(self._pause)

    def resume(self) -> None:
        """Forward again, the waiting bytes first."""
        self._apply(self._resume)

    def delay(self, seconds: float) -> None:
        """Hold every chunk `seconds` before forwarding it (0 ends the delay)."""

        def set_delay() -> None:
            self._delay = seconds

        self._apply(set_delay)

    def drop(self) -> None:
        """Close every open connection cleanly (FIN to both ends)."""
        self._apply(self._drop)

    def reset(self, after: int | None = None, *, every: bool = False) -> None:
        """Reset (RST) every open connection, at once or after `after` more reply bytes.

        With `every`, connections opened later are reset after `after` reply bytes too
        (at once when `after` is None: they are accepted, then reset) until `heal()`.
        """
        self._apply(lambda: self._reset(after, every))

    def half_close(self) -> None:
        """Shut the write side toward the client of every open connection."""
        self._apply(self._half_close)

    def blackhole(self) -> None:
        """Read everything, forward and answer nothing, on open and new connections."""
        self._apply(self._start_blackhole)

    def heal(self) -> None:
        """Every fault off; blackholed connections are reset."""
        self._apply(self._heal)

    # -- inside the proxy's loop -----------------------------------------------------

    def _apply(self, action: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the proxy is not started")
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                action()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        loop.call_soon_threadsafe(run)
        done.result(CONTROL_TIMEOUT)

    async def _listen(self, ready: concurrent.futures.Future[int]) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        ready.set_result(int(self._server.sockets[0].getsockname()[1]))

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._kill(link, rst=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _pause(self) -> None:
        assert self._flowing is not None
        self._flowing.clear()

    def _resume(self) -> None:
        assert self._flowing is not None
        self._flowing.set()

    def _drop(self) -> None:
        for link in list(self._links):
            self._kill(link, rst=False)

    def _reset(self, after: int | None, every: bool) -> None:
        for link in list(self._links):
            if after is None:
                self._kill(link, rst=True)
            else:
                link.reply_budget = after
        if every:
            self._reset_every = -1 if after is None else after

    def _half_close(self) -> None:
        for link in self._links:
            if not link.half_closed and not link.client.transport.is_closing():
                link.half_closed = True
                with contextlib.suppress(OSError, RuntimeError):
                    link.client.write_eof()

    def _start_blackhole(self) -> None:
        self._blackhole = True
        for link in self._links:
            link.blackholed = True

    def _heal(self) -> None:
        self._resume()
        self._delay = 0.0
        self._blackhole = False
        self._reset_every = None
        for link in list(self._links):
            link.reply_budget = None
            if link.blackholed:
                self._kill(link, rst=True)

    def _kill(self, link: _Link, *, rst: bool) -> None:
        link.dead = True
        for writer in link.writers():
            if rst:
                _rst(writer)
            elif not writer.transport.is_closing():
                writer.close()
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._links.discard(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._track(asyncio.current_task())
        link = _Link(writer)
        self._links.add(link)
        try:
            if self._reset_every == -1:
                self._kill(link, rst=True)
                return
            link.reply_budget = self._reset_every
            if self._blackhole:
                link.blackholed = True
                await self._discard(reader)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                self._kill(link, rst=True)  # nothing listens: the client sees a reset
                return
            link.upstream = up_writer
            if link.dead:  # dropped or reset while connecting
                self._kill(link, rst=True)
                return
            up = asyncio.current_task()
            assert up is not None
            down = asyncio.create_task(self._pump(link, up_reader, writer, to_client=True))
            self._track(down)
            link.tasks.extend([up, down])
            await self._pump(link, reader, up_writer, to_client=False)
            await asyncio.gather(down, return_exceptions=True)
        except asyncio.CancelledError:
            pass
        finally:
            if not link.dead:
                self._kill(link, rst=False)

    def _track(self, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(CHUNK):
            pass

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        to_client: bool,
    ) -> None:
        """Forward one direction until EOF or an error, minding the faults per chunk."""
        assert self._flowing is not None
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                if self._delay:
                    await asyncio.sleep(self._delay)
                    await self._flowing.wait()
                if link.dead:
                    return
                if link.blackholed or (to_client and link.half_closed):
                    continue  # read and gone
                budget = link.reply_budget
                if to_client and budget is not None and len(data) >= budget:
                    writer.write(data[:budget])
                    self.to_client += budget
                    with contextlib.suppress(OSError):
                        await writer.drain()
                    self._kill(link, rst=True)
                    return
                if to_client and budget is not None:
                    link.reply_budget = budget - len(data)
                writer.write(data)
                if to_client:
                    self.to_client += len(data)
                else:
                    self.to_server += len(data)
                await writer.drain()
        except (OSError, RuntimeError):
            # One side reset: so is the other, as a router would pass on an RST.
            if not link.dead:
                self._kill(link, rst=True)
            return
        # EOF from this side: pass it on (half-close), the other direction goes on.
        if not link.dead and not link.blackholed:
            if to_client and link.half_closed:
                return
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof() and not writer.transport.is_closing():
                    writer.write_eof()
