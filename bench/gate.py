"""The gate's own cost per request, in process: resolving the endpoint and copying the scope.

    .venv/bin/python -m bench.gate      # alone (also run by `python -m bench`)

The gate resolves every request with the routes' own `matches` and hands the matched
top-level route to the router's selection, so top-level routes are matched once. Measured
here, per request, for the layouts users build (the target first among few routes, last
among 20, behind included routers three deep, under a mount): a public route's whole
in-process request with and without policyroute, and `resolve()` alone. Target: the gate
adds at most 2 us a request over the design before it (run `--requests` from that checkout,
which prints the same columns without `resolve`).
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.routing import Match, Mount, Route, Router
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

    mounted.mount("/m", Router(routes=[Route("/probe", page)]))
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


def measure(resolution: bool = True) -> list[tuple[str, float, float, float | None]]:
    """(layout, bare us, policyroute us, gate's extra us or None) per request, per layout.

    With `resolution=False` nothing of `policyroute.gate` is imported, so the same figures
    can be taken from a checkout of the design before the gate.
    """
    rows: list[tuple[str, float, float, float | None]] = []
    work = Path(tempfile.mkdtemp(prefix="policyroute-gate-"))
    for name, (app, path, template) in _layouts().items():
        bare = _request_us(app, path)
        policy = work / name.replace(" ", "-")
        policy.mkdir()
        (policy / "p.yaml").write_text(f"version: 1\nroutes:\n  GET {template}: {{public: true}}\n")
        policyroute.install(app, policy)
        extra: float | None = None
        if resolution:
            scope = _scope(path)
            routed = _per_call(functools.partial(_router_match, app.router.routes, scope))
            extra = _per_call(functools.partial(_gate_match, app.router, scope)) - routed
        rows.append((name, bare, _request_us(app, path), extra))
    return rows


def _router_match(routes: list[Any], scope: Scope) -> None:
    """What the routers' own loops do to pick a route, and no longer need to.

    The top-level loop, and the loop of each router mounted (as itself) on the way down.
    """
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            if isinstance(route, Mount) and isinstance(route.app, Router):
                _router_match(route.app.routes, {**scope, **child})
            return


def _gate_match(router: Any, scope: Scope) -> None:
    """What the gate does instead: resolve to the endpoint, hand the route over, copy the scope."""
    from policyroute.gate import Handoff, _fresh, _select_of, resolve

    found = resolve(router, scope)
    fresh = _fresh(scope)
    Handoff(router, found.top, found.child, _router_match, found.hops)  # type: ignore[arg-type]
    for inner, _, child in found.hops or ():
        _select_of(inner)
        fresh.update(child)


def main(resolution: bool = True) -> int:
    """Print the table; the gate's share is the extra over the design before it."""
    print("[bench] gate: whole requests in process", file=sys.stderr, flush=True)
    print("\n| layout | bare FastAPI us/req | policyroute (public) us/req | gate's extra us/req |")
    print("|---|---|---|---|")
    for name, bare, full, extra in measure(resolution):
        shown = f"{extra:+.2f}" if extra is not None else "-"
        print(f"| {name} | {bare:.1f} | {full:.1f} | {shown} |")
    print(
        f"\ntarget: the gate adds at most {TARGET_US:g} us a request. `gate's extra`: resolve, "
        "hand over and copy the scope, minus the router's own top-level match it replaces "
        "(timed back to back in one process: steadier than whole requests, which move "
        "10-20 us between runs here)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(resolution=sys.argv[1:] != ["--requests"]))
