"""Fallback load generator: asyncio streams over persistent HTTP/1.1 connections.

Run as ``python -m bench.pyload`` in its own process. Each connection sends a
pre-encoded request (with ``--unique-query``, the same bytes with the next number
of one counter shared by all connections in the query), reads the status line,
headers and a ``Content-Length`` body, and repeats; chunked responses are not
supported. The result is printed as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.loadgen import LoadError, LoadResult, Target, percentile, query_prefix, run_id

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


Requests = Callable[[], bytes]


def encode_request(target: Target, path: str | None = None) -> bytes:
    """Return the bytes of a keep-alive ``GET`` of ``path`` (default: the target's)."""
    lines = [f"GET {target.path if path is None else path} HTTP/1.1"]
    lines += [f"Host: {target.host}:{target.port}"]
    lines += [f"{name}: {value}" for name, value in target.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def request_source(target: Target, run: str) -> Requests:
    """Return a function giving each request's bytes: unique per call with ``unique_query``."""
    if not target.unique_query:
        request = encode_request(target)
        return lambda: request
    # Split the request around the counter once, so each request costs one join.
    marker = "\0"
    head, tail = encode_request(target, query_prefix(target.path, run) + marker).split(
        marker.encode("latin-1")
    )
    counter = itertools.count(1)
    return lambda: b"%s%d%s" % (head, next(counter), tail)


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


async def connection(target: Target, requests: Requests, deadline: float, tally: Tally) -> None:
    """Send requests on one connection until ``deadline``, reconnecting after errors."""
    while time.perf_counter() < deadline:
        try:
            await _session(target, requests, deadline, tally)
        except _CONNECTION_ERRORS:
            tally.errors += 1
            await asyncio.sleep(_BACKOFF_S)


async def _session(target: Target, requests: Requests, deadline: float, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    clock = time.perf_counter
    try:
        while (start := clock()) < deadline:
            ok = await exchange(reader, writer, requests())
            tally.latencies_ms.append((clock() - start) * 1000.0)
            tally.errors += not ok
    finally:
        writer.close()


async def drive(target: Target, seconds: float) -> LoadResult:
    """Drive ``target`` with ``target.connections`` connections for ``seconds``."""
    requests = request_source(target, run_id())
    tallies = [Tally() for _ in range(target.connections)]
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(connection(target, requests, deadline, t) for t in tallies))
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
        *(("--unique-query",) if target.unique_query else ()),
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
    parser.add_argument(
        "--unique-query", action="store_true", help="give every request its own ?n=<unique>"
    )
    args = parser.parse_args(argv)
    headers = tuple(_split_header(h) for h in args.header)
    target = Target(args.host, args.port, args.path, headers, args.connections, args.unique_query)
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
