"""Worker CPU per request of a bench policy set, in process: no HTTP, no load generator.

    .venv/bin/python -m bench.inproc full local        # this checkout
    .venv/bin/python -m bench.inproc --tasks 32 bare full   # 32 requests in flight
    (cd OTHER && /path/to/.venv/bin/python -m bench.inproc full)   # another, to compare

Serves ``bench/policies/<set>`` (or ``bare``: the handler alone) through the ASGI app
against a real Valkey and prints the process CPU µs per request over 12 rounds of 1,000
requests (each with its own query, the bench's bearer token), least and median, with
`--tasks` requests in flight. Whole-bench ratios move 10-20 % and more between runs on a
shared 2-core machine; alternating this between two checkouts, process after process,
shows a few µs.
"""

from __future__ import annotations

import argparse
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
from bench.backend import Valkey
from bench.backend import valkey as start_valkey
from bench.lua import _drive, _scopes

ROUNDS = 12
PER_ROUND = 1000


async def measure(
    policy: str, tasks: int = 1, backend: Valkey | None = None
) -> list[tuple[float, float]]:
    """(process, Valkey) CPU µs per request of each round, `tasks` requests at a time.

    Valkey's is 0 without `backend` (the server's own CPU count, read before and after).
    """
    os.environ["BENCH_POLICY"] = policy
    module = "bench.apps.bare" if policy == "bare" else "bench.apps.policyroute_app"
    sys.modules.pop(module, None)
    app: Any = importlib.import_module(module).app
    rounds = []
    ok = 0
    async with LifespanManager(app):
        for number in range(ROUNDS):
            server = backend.cpu_seconds() if backend is not None else 0.0
            started = time.process_time()
            ok += await _drive(app, _scopes("/ping", PER_ROUND, number * PER_ROUND), tasks)
            worker = (time.process_time() - started) / PER_ROUND * 1e6
            if backend is not None:
                server = (backend.cpu_seconds() - server) / PER_ROUND * 1e6
            rounds.append((worker, server))
    if ok != ROUNDS * PER_ROUND:
        raise RuntimeError(f"{policy}: not every request answered 2xx")
    return rounds


def main(argv: list[str] | None = None) -> int:
    """Print least and median µs per request for each policy set named."""
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__)
    parser.add_argument("policies", nargs="*", default=["full"], help="bench/policies sets or bare")
    parser.add_argument("--tasks", type=int, default=1, help="requests in flight (wrk's -c)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (production's loop)")
    args = parser.parse_args(argv)
    with start_valkey() as backend:
        os.environ[VALKEY_URL_ENV] = backend.url
        for policy in args.policies:
            if args.uvloop:
                import uvloop

                rounds = uvloop.run(measure(policy, args.tasks, backend))
            else:
                rounds = asyncio.run(measure(policy, args.tasks, backend))
            worker = [w for w, _ in rounds]
            server = [v for _, v in rounds]
            loop = " uvloop" if args.uvloop else ""
            print(
                f"{Path.cwd()} {policy} x{args.tasks}{loop}: worker CPU {min(worker):.1f} least, "
                f"{statistics.median(worker):.1f} median; Valkey CPU {min(server):.1f} least, "
                f"{statistics.median(server):.1f} median us per request"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
