"""An app, its policies and helpers shared by the observability tests."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import NoOpTracerProvider
from prometheus_client import REGISTRY

import policyroute
from policyroute.engine.engine import Engine
from policyroute.observability import tracing
from policyroute.observability.logs import sanitize_logger
from tests.steps.identity_kit import SETTINGS, bearer, token

__all__ = ["SETTINGS", "bearer", "token"]

APP_LOG = logging.getLogger("tests.observability.app")
sanitize_logger(APP_LOG)  # an application protecting its own logger


def make_app(calls: dict[str, int], **options: Any) -> FastAPI:
    """Handlers for every observability test."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, **options)

    def hit(name: str) -> int:
        calls[name] = calls.get(name, 0) + 1
        return calls[name]

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        hit("ping")
        return {"ok": True}

    @app.get("/me")
    async def me(who: policyroute.Principal = Depends(policyroute.principal)) -> dict[str, Any]:
        hit("me")
        return {"subject": who.subject}

    @app.get("/items/{item}")
    async def item(item: str, sleep: float = 0.0) -> dict[str, Any]:
        n = hit("items")
        if sleep:
            await anyio.sleep(sleep)
        return {"item": item, "n": n}

    @app.post("/jobs")
    async def jobs(request: Request, status: int = 201) -> Response:
        n = hit("jobs")
        body = await request.json()
        return JSONResponse({"job": n, "name": body.get("name")}, status_code=status)

    @app.get("/work")
    async def work(status: int = 200) -> Response:
        hit("work")
        return JSONResponse({"status": status}, status_code=status)

    @app.post("/profile")
    async def profile(request: Request) -> dict[str, bool]:
        hit("profile")
        body = await request.json()
        email = body.get("email", "")
        # An application logging what it should not: every way a value reaches a log line.
        APP_LOG.info("profile update email=%s", email)
        APP_LOG.info("profile update", extra={"profile": body, "email": email})
        APP_LOG.warning("raw headers %s", dict(request.headers))
        try:
            raise ValueError(f"cannot store {email} for {request.headers.get('authorization')}")
        except ValueError:
            APP_LOG.exception("profile failed")
        return {"ok": True}

    @app.get("/boom")
    async def boom(request: Request) -> dict[str, bool]:
        raise RuntimeError(f"handler failed with {request.headers.get('authorization')}")

    return app


def write(policy_dir: Path, routes: str, settings: str = SETTINGS) -> None:
    """One policy file: the dev issuer settings and `routes` (indented two spaces)."""
    (policy_dir / "routes.yaml").write_text(f"version: 1\n{settings}routes:\n{routes}")


def install(
    policy_dir: Path,
    routes: str,
    *,
    valkey_url: str | None = None,
    pulsar_url: str | None = None,
    health: bool = False,
    metrics: bool = False,
    calls: dict[str, int] | None = None,
    policy_settings: str = SETTINGS,
    key_prefix: str | None = None,
    **settings: Any,
) -> tuple[FastAPI, Engine]:
    """An app gated by `routes`, Valkey keys under a fresh prefix (unless given)."""
    write(policy_dir, routes, policy_settings)
    app = make_app(calls if calls is not None else {})
    config = policyroute.Settings(
        valkey_url=valkey_url,
        pulsar_url=pulsar_url,
        key_prefix=key_prefix or "t" + uuid.uuid4().hex[:10],
        **settings,
    )
    engine = policyroute.install(app, policy_dir, settings=config, health=health, metrics=metrics)
    return app, engine


@contextlib.asynccontextmanager
async def running(app: FastAPI, address: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """Startup, a client, shutdown."""
    async with LifespanManager(app, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=(address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


def sample(name: str, **labels: str) -> float:
    """A metric sample of the default registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """No OpenTelemetry SDK for policyroute inside the block (the suite runs traced)."""
    tracing.set_provider(NoOpTracerProvider())
    try:
        yield
    finally:
        tracing.set_provider(None)


def problem(response: httpx.Response) -> str:
    """The problem type slug of a problem+json answer."""
    assert response.headers["content-type"] == "application/problem+json"
    return str(response.json()["type"]).rsplit(":", 1)[-1]
