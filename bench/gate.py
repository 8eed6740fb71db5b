"""The gate's own cost per request, in process.

    .venv/bin/python -m bench.gate      # alone (also run by `python -m bench`)

The gate resolves every request with the routes' own `matches` and hands what it matched to
the routers' own selection (top level, plain mounts, FastAPI inclusions), so no router
matches its routes again. Measured here for the layouts users build (the target first among
few routes, last among 20, behind included routers three deep, under a mounted router):
whole in-process requests of three copies of each layout in one event loop, in alternating
rounds: bare, the gate alone with a decision that allows everything (what the gate costs,
apart from the chain a policy runs), and policyroute with a public policy. Target: the gate
adds at most 2 us a request.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.routing import Route, Router
from starlette.types import Message, Scope

import policyroute
from policyroute.asgi.gate import gate_router

TARGET_US = 2.0
ROUNDS = 25
CALLS = 400
WARM = 300


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


def _through(scope: Scope, receive: Any, send: Any, app: Any, marks_entry: bool) -> Any:
    """A chain that allows everything (no frame of its own): what is left is the gate."""
    return app(scope, receive, send)


def _pass(method: str, endpoint: Any) -> Any:
    """A decision that allows everything."""
    return _through


def _rounds(apps: list[FastAPI], path: str) -> list[list[float]]:
    """us per request of each app, in ROUNDS alternating rounds (one event loop)."""

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    async def run(app: FastAPI, n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await app(_scope(path), receive, send)
        return (time.perf_counter() - started) / n * 1e6

    async def all_rounds() -> list[list[float]]:
        for app in apps:
            await run(app, WARM)
        out: list[list[float]] = [[] for _ in apps]
        for _ in range(ROUNDS):
            for i, app in enumerate(apps):
                out[i].append(await run(app, CALLS))
        return out

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(all_rounds())
    finally:
        loop.close()


def measure() -> list[tuple[str, float, float, float]]:
    """(layout, bare us, policyroute us, gate's extra us) per request, per layout.

    Three copies of each layout in one process: bare, the gate alone with a decision that
    allows everything, and policyroute installed with a public policy. The gate's extra is
    the median over rounds of (gate alone - bare), each pair timed back to back.
    """
    rows: list[tuple[str, float, float, float]] = []
    work = Path(tempfile.mkdtemp(prefix="policyroute-gate-"))
    bare_apps, gated_apps, full_apps = _layouts(), _layouts(), _layouts()
    for name, (bare, path, template) in bare_apps.items():
        gated = gated_apps[name][0]
        gate_router(gated.router, _pass)
        full = full_apps[name][0]
        policy = work / name.replace(" ", "-")
        policy.mkdir()
        (policy / "p.yaml").write_text(f"version: 1\nroutes:\n  GET {template}: {{public: true}}\n")
        policyroute.install(full, policy)
        plain, alone, whole = _rounds([bare, gated, full], path)
        extra = statistics.median(g - b for g, b in zip(alone, plain, strict=True))
        rows.append((name, statistics.median(plain), statistics.median(whole), extra))
    return rows


def main() -> int:
    """Print the table; the gate's share is the extra over the design before it."""
    print("[bench] gate: whole requests in process", file=sys.stderr, flush=True)
    print("\n| layout | bare FastAPI us/req | policyroute (public) us/req | gate's extra us/req |")
    print("|---|---|---|---|")
    for name, bare, full, extra in measure():
        print(f"| {name} | {bare:.1f} | {full:.1f} | {extra:+.2f} |")
    print(
        f"\ntarget: the gate adds at most {TARGET_US:g} us a request. `gate's extra`: the "
        "median over rounds of (gate alone - bare), each pair of whole requests timed back "
        "to back in one event loop"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
