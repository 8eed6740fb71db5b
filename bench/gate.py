"""The gate's own cost per request, in process: resolving the endpoint and copying the scope.

    .venv/bin/python -m bench.gate      # alone (also run by `python -m bench`)

The gate resolves every request with the routes' own `matches` before the router matches
it again to dispatch; that second match is what the gate adds over a gate on each route
object. Measured here: `resolve()` plus the scope copy the dispatch makes, per request, for
the layouts users build (the target first among few routes, last among 20, behind included
routers three deep, under a mount), against the whole in-process request of a public route
with and without policyroute. Target: the gate's share at most 2 us a request.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.routing import Mount, Route
from starlette.types import Message, Scope

import policyroute

TARGET_US = 2.0
ROUNDS = 7
CALLS = 20_000


def _scope(path: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 40000),
        "server": ("bench", 80),
    }


async def _probe() -> dict[str, bool]:
    return {"ok": True}


def _layouts() -> dict[str, tuple[FastAPI, str, str]]:
    """name -> (app, request path, policy template)."""
    out: dict[str, tuple[FastAPI, str, str]] = {}
    first = FastAPI()
    first.get("/probe")(_probe)
    for i in range(4):
        first.get(f"/other{i}/{{item_id}}")(_probe)
    out["first of 5"] = (first, "/probe", "/probe")
    last = FastAPI()
    for i in range(19):
        last.get(f"/other{i}/{{item_id}}")(_probe)
    last.get("/probe/{item_id}")(_probe)
    out["last of 20"] = (last, "/probe/7", "/probe/{item_id}")
    nested = FastAPI()
    routers = [APIRouter() for _ in range(3)]
    routers[-1].get("/probe")(_probe)
    routers[1].include_router(routers[2], prefix="/c")
    routers[0].include_router(routers[1], prefix="/b")
    nested.include_router(routers[0], prefix="/a")
    out["included 3 deep"] = (nested, "/a/b/c/probe", "/a/b/c/probe")
    mounted = FastAPI()

    async def page(request: Any) -> Any:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("ok")

    mounted.mount("/m", Mount("", routes=[Route("/probe", page)]))
    out["mounted router"] = (mounted, "/m/probe", "/m/probe")
    return out


def _per_call(fn: Callable[[], object], calls: int = CALLS) -> float:
    best = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best.append((time.perf_counter() - started) / calls)
    return statistics.median(best) * 1e6


def _request_us(app: FastAPI, path: str) -> float:
    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    async def run(n: int) -> None:
        for _ in range(n):
            await app(_scope(path), receive, send)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run(500))  # warm
        samples = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            loop.run_until_complete(run(2000))
            samples.append((time.perf_counter() - started) / 2000)
    finally:
        loop.close()
    return statistics.median(samples) * 1e6


def measure() -> list[tuple[str, float, float, float]]:
    """(layout, gate us, bare request us, policyroute request us) for each layout."""
    rows = []
    work = Path(tempfile.mkdtemp(prefix="policyroute-gate-"))
    for name, (app, path, template) in _layouts().items():
        bare = _request_us(app, path)
        policy = work / name.replace(" ", "-")
        policy.mkdir()
        (policy / "p.yaml").write_text(f"version: 1\nroutes:\n  GET {template}: {{public: true}}\n")
        policyroute.install(app, policy)
        from policyroute.gate import resolve

        router = app.router
        scope = _scope(path)

        def gate_work(router: Any = router, scope: Scope = scope) -> None:
            resolve(router, scope)
            dict(scope)

        rows.append((name, _per_call(gate_work), bare, _request_us(app, path)))
    return rows


def _request_only() -> None:
    """Print whole-request figures alone (runs against any version of policyroute)."""
    work = Path(tempfile.mkdtemp(prefix="policyroute-gate-"))
    for name, (app, path, template) in _layouts().items():
        bare = _request_us(app, path)
        policy = work / name.replace(" ", "-")
        policy.mkdir()
        (policy / "p.yaml").write_text(f"version: 1\nroutes:\n  GET {template}: {{public: true}}\n")
        policyroute.install(app, policy)
        print(f"| {name} | {bare:.1f} | {_request_us(app, path):.1f} |")


def main() -> int:
    """Print the table and the target; a miss is reported, not fatal."""
    print("[bench] gate: the gate's own cost in process", file=sys.stderr, flush=True)
    rows = measure()
    print("\n| layout | gate us/req | bare FastAPI us/req | policyroute (public) us/req |")
    print("|---|---|---|---|")
    for name, gate, bare, full in rows:
        print(f"| {name} | {gate:.2f} | {bare:.1f} | {full:.1f} |")
    worst = max(r[1] for r in rows)
    verdict = "met" if worst <= TARGET_US else "MISS"
    print(f"\ntarget: the gate at most {TARGET_US:g} us a request: worst {worst:.2f} us", verdict)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--requests"]:
        _request_only()
        sys.exit(0)
    sys.exit(main())
