"""An app whose handlers fail on demand, for the resilience tests (and uvicorn workers)."""

from __future__ import annotations

import os
import uuid
from collections import Counter
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import policyroute
from policyroute.engine.engine import Engine


def make_app(calls: Counter[str]) -> FastAPI:
    """Handlers that count their calls and fail the first `fail` calls of a `key`."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def failing(key: str, fail: int) -> bool:
        calls[key] += 1
        return calls[key] <= fail

    @app.api_route("/work", methods=["GET", "POST", "PUT"])
    async def work(
        request: Request,
        key: str = "k",
        fail: int = 0,
        status: int = 500,
        sleep: float = 0.0,
        raise_: str = "",
    ) -> Response:
        body = await request.body()
        calls["work"] += 1
        if sleep:
            await anyio.sleep(sleep)
        if failing(key, fail):
            if raise_ == "connection":
                raise ConnectionError("upstream refused")
            if raise_ == "value":
                raise ValueError("bad input")
            return JSONResponse({"failed": calls[key]}, status_code=status)
        return JSONResponse(
            {"ok": True, "call": calls[key], "body": body.decode(), "pid": os.getpid()},
            headers={"x-pid": str(os.getpid())},
        )

    return app


def install(
    policy_dir: Path, policy: str, valkey_url: str, calls: Counter[str], prefix: str | None = None
) -> FastAPI:
    """An app gated by `policy`; keys under `prefix` (fresh unless given, to share state)."""
    (policy_dir / "routes.yaml").write_text(policy)
    app = make_app(calls)
    settings = policyroute.Settings(
        valkey_url=valkey_url, key_prefix=prefix or "r" + uuid.uuid4().hex[:10]
    )
    policyroute.install(app, policy_dir, settings=settings)
    return app


def engine(app: FastAPI) -> Engine:
    """The engine `install` attached to the app."""
    found: Engine = app.state.policyroute
    return found


def worker_app() -> FastAPI:
    """The app of a uvicorn worker process; policies and Valkey come from POLICYROUTE_*."""
    app = make_app(Counter())
    policyroute.install(app)
    return app
