"""A small app and client for the stateful-step tests (rate limits, credits, idempotency, cache)."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import policyroute
from policyroute.engine.engine import Engine


def make_app(calls: Counter[str]) -> FastAPI:
    """Handlers that count their calls and answer as the query asks."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/limited")
    async def limited() -> dict[str, bool]:
        calls["limited"] += 1
        return {"ok": True}

    @app.get("/other")
    async def other() -> dict[str, bool]:
        calls["other"] += 1
        return {"ok": True}

    @app.api_route("/charge", methods=["GET", "POST"])
    async def charge(status: int = 200, sleep: float = 0.0) -> Response:
        calls["charge"] += 1
        if sleep:
            await anyio.sleep(sleep)
        if status == 599:
            raise RuntimeError("handler failed")
        return JSONResponse({"charged": True}, status_code=status)

    @app.post("/jobs")
    async def jobs(request: Request, sleep: float = 0.0, status: int = 201) -> Response:
        calls["jobs"] += 1
        body = await request.json()
        if sleep:
            await anyio.sleep(sleep)
        n = calls["jobs"]
        return JSONResponse({"job": n, "echo": body}, status_code=status, headers={"x-job": str(n)})

    @app.get("/cached/{item}")
    async def cached(
        item: str, request: Request, sleep: float = 0.0, cookie: bool = False, status: int = 200
    ) -> Response:
        calls["cached"] += 1
        if sleep:
            await anyio.sleep(sleep)
        who = request.client.host if request.client else "-"
        response = JSONResponse(
            {"item": item, "n": calls["cached"], "client": who}, status_code=status
        )
        if cookie:
            response.set_cookie("session", "abc")
        return response

    @app.get("/greeting")
    async def greeting(request: Request) -> dict[str, str | int]:
        """A page that greets whoever the caller's cookie, token or API key names."""
        calls["greeting"] += 1
        who = (
            request.cookies.get("session")
            or request.headers.get("authorization")
            or request.headers.get("x-api-key")
            or "stranger"
        )
        return {"hello": who, "n": calls["greeting"]}

    @app.get("/slow")
    async def slow(sleep: float = 0.0) -> dict[str, bool]:
        calls["slow"] += 1
        await anyio.sleep(sleep)
        return {"ok": True}

    async def stream(chunks: int = 20, size: int = 16, sleep: float = 0.0) -> Response:
        """`chunks` lines of `size` bytes, `sleep` seconds apart."""
        calls["stream"] += 1
        line = b"x" * (size - 1) + b"\n"

        async def lines() -> AsyncIterator[bytes]:
            for i in range(chunks):
                if i and sleep:
                    await anyio.sleep(sleep)
                yield line

        return StreamingResponse(lines(), media_type="application/octet-stream")

    for path in ("/stream", "/stream/refunded", "/stream/cached", "/stream/once"):
        app.add_api_route(path, stream, methods=["GET", "POST"])

    async def stamp(request: Request, sleep: float = 0.0) -> dict[str, Any]:
        """When the handler ran, in which process, and a run id no other run has."""
        calls["stamp"] += 1
        at = time.time()
        await request.body()
        if sleep:
            await anyio.sleep(sleep)
        return {"at": at, "run": uuid.uuid4().hex, "pid": os.getpid()}

    for path in ("/throttled", "/debounced", "/joined"):
        app.add_api_route(path, stamp, methods=["GET", "POST"])

    return app


def install(policy_dir: Path, policy: str, valkey_url: str, calls: Counter[str]) -> FastAPI:
    """An app gated by `policy`, with keys under a fresh prefix so tests never share state."""
    (policy_dir / "routes.yaml").write_text(policy)
    app = make_app(calls)
    settings = policyroute.Settings(valkey_url=valkey_url, key_prefix="t" + uuid.uuid4().hex[:10])
    policyroute.install(app, policy_dir, settings=settings)
    return app


def engine(app: FastAPI) -> Engine:
    """The engine `install` attached to the app."""
    found: Engine = app.state.policyroute
    return found


@asynccontextmanager
async def client(app: FastAPI, address: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app from `address`."""
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Startup, a client from 127.0.0.1, shutdown."""
    async with LifespanManager(app), client(app) as c:
        yield c


def worker_app() -> FastAPI:
    """The app for uvicorn worker processes; policies and Valkey come from POLICYROUTE_*.

    Every answer names the process that gave it (`x-pid`), so tests can see the spread.
    """
    app = make_app(Counter())
    policyroute.install(app)
    return tag_pid(app)


def tag_pid(app: FastAPI) -> FastAPI:
    """`app`, every answer of which names the process that gave it (`x-pid`)."""
    pid = str(os.getpid()).encode()
    inner = app.build_middleware_stack

    def build() -> ASGIApp:
        wrapped = inner()

        async def tagged(scope: Scope, receive: Receive, send: Send) -> None:
            async def tag(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"x-pid", pid)]}
                await send(message)

            await wrapped(scope, receive, tag)

        return tagged

    app.build_middleware_stack = build  # type: ignore[method-assign]
    return app
