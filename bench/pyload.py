"""Fallback load generator: asyncio streams over persistent HTTP/1.1 connections.

Run as ``python -m bench.pyload`` in its own process. Each connection sends one
pre-encoded request, reads the status line, headers and a ``Content-Length``
body, and repeats; chunked responses are not supported. The result is printed
as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.loadgen import LoadError, LoadResult, Target, percentile

ROOT = Path(__file__).resolve().parent.parent
_HEAD_END = b"\r\n\r\n"
_LENGTH = b"\r\ncontent-length:"
# Pause after a failed connection so a refusing server is not hammered in a tight loop.
_BACKOFF_S = 0.01
_CONNECTION_ERRORS = (
    OSError,
    ValueError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    LoadError,
)


@dataclasses.dataclass(slots=True)
class Tally:
    """What one connection measured."""

    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0


def encode_request(target: Target) -> bytes:
    """Return the bytes of the keep-alive ``GET`` repeated on every connection."""
    lines = [f"GET {target.path} HTTP/1.1", f"Host: {target.host}:{target.port}"]
    lines += [f"{name}: {value}" for name, value in target.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def body_length(head: bytes) -> int:
    """Return the ``Content-Length`` of a response head (the bytes up to the blank line)."""
    lowered = head.lower()
    start = lowered.find(_LENGTH)
    if start < 0:
        raise LoadError("response has no Content-Length")
    end = lowered.find(b"\r\n", start + len(_LENGTH))
    return int(lowered[start + len(_LENGTH) : end if end >= 0 else None])


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> bool:
    """Send one request and read its response; return whether the status was 2xx."""
    writer.write(request)
    head = await reader.readuntil(_HEAD_END)
    await reader.readexactly(body_length(head))
    return head[9:10] == b"2"


async def connection(target: Target, request: bytes, deadline: float, tally: Tally) -> None:
    """Repeat the request on one connection until ``deadline``, reconnecting after errors."""
    while time.perf_counter() < deadline:
        try:
            await _session(target, request, deadline, tally)
        except _CONNECTION_ERRORS:
            tally.errors += 1
            await asyncio.sleep(_BACKOFF_S)


async def _session(target: Target, request: bytes, deadline: float, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    clock = time.perf_counter
    try:
        while (start := clock()) < deadline:
            ok = await exchange(reader, writer, request)
            tally.latencies_ms.append((clock() - start) * 1000.0)
            tally.errors += not ok
    finally:
        writer.close()


async def drive(target: Target, seconds: float) -> LoadResult:
    """Drive ``target`` with ``target.connections`` connections for ``seconds``."""
    request = encode_request(target)
    tallies = [Tally() for _ in range(target.connections)]
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(connection(target, request, deadline, t) for t in tallies))
    elapsed = time.perf_counter() - started
    latencies = sorted(ms for t in tallies for ms in t.latencies_ms)
    return LoadResult(
        requests=len(latencies),
        errors=sum(t.errors for t in tallies),
        seconds=elapsed,
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
    )


class PyLoad:
    """Drives a target with this module, run in a separate process."""

    name = "python-asyncio"

    def run(self, target: Target, seconds: int, threads: int) -> LoadResult:
        """Run the generator process for ``seconds`` and read its JSON result."""
        done = subprocess.run(
            _command(target, seconds), capture_output=True, text=True, check=False, cwd=ROOT
        )
        if done.returncode != 0:
            raise LoadError(f"{self.name} exited with {done.returncode}: {done.stderr.strip()}")
        return LoadResult(**json.loads(done.stdout))


def _command(target: Target, seconds: int) -> list[str]:
    headers = [arg for name, value in target.headers for arg in ("--header", f"{name}: {value}")]
    return [
        sys.executable,
        "-m",
        "bench.pyload",
        f"--host={target.host}",
        f"--port={target.port}",
        f"--path={target.path}",
        f"--connections={target.connections}",
        f"--seconds={seconds}",
        *headers,
    ]


def _parse_args(argv: list[str] | None) -> tuple[Target, float]:
    parser = argparse.ArgumentParser(prog="python -m bench.pyload", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--header", action="append", default=[], help="NAME: VALUE")
    args = parser.parse_args(argv)
    headers = tuple(_split_header(h) for h in args.header)
    target = Target(args.host, args.port, args.path, headers, args.connections)
    return target, float(args.seconds)


def _split_header(header: str) -> tuple[str, str]:
    name, _, value = header.partition(":")
    return name.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    """Drive the target given on the command line and print the result as JSON."""
    target, seconds = _parse_args(argv)
    result = asyncio.run(drive(target, seconds))
    print(json.dumps(dataclasses.asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
