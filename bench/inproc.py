"""Worker CPU per request of a bench policy set, in process: no HTTP, no load generator.

    .venv/bin/python -m bench.inproc full local        # this checkout
    (cd OTHER && /path/to/.venv/bin/python -m bench.inproc full)   # another, to compare

Serves ``bench/policies/<set>`` through the ASGI app against a real Valkey and prints the
process CPU µs per request over 12 rounds of 1,000 requests (each with its own query, the
bench's bearer token), least and median. Whole-bench ratios move 10-20 % and more between
runs on a shared 2-core machine; alternating this between two checkouts, process after
process, shows a few µs.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from asgi_lifespan import LifespanManager

from bench.apps import VALKEY_URL_ENV
from bench.backend import valkey as start_valkey
from bench.lua import _scopes

ROUNDS = 12
PER_ROUND = 1000


async def measure(policy: str) -> list[float]:
    """Process CPU µs per request of each round."""
    os.environ["BENCH_POLICY"] = policy
    sys.modules.pop("bench.apps.policyroute_app", None)
    app: Any = importlib.import_module("bench.apps.policyroute_app").app
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))

    rounds = []
    async with LifespanManager(app):
        for number in range(ROUNDS):
            started = time.process_time()
            for scope in _scopes("/ping", PER_ROUND, number * PER_ROUND):
                await app(scope, receive, send)
            rounds.append((time.process_time() - started) / PER_ROUND * 1e6)
    if any(status != 200 for status in statuses):
        raise RuntimeError(f"{policy}: not every request answered 200")
    return rounds


def main(argv: list[str] | None = None) -> int:
    """Print least and median µs per request for each policy set named."""
    policies = (argv if argv is not None else sys.argv[1:]) or ["full"]
    with start_valkey() as backend:
        os.environ[VALKEY_URL_ENV] = backend.url
        for policy in policies:
            rounds = asyncio.run(measure(policy))
            print(
                f"{Path.cwd()} {policy}: worker CPU {min(rounds):.1f} least, "
                f"{statistics.median(rounds):.1f} median us per request"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
