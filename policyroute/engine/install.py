"""`policyroute.install`: an engine for an app, the gate on its routes, and the features
that attach to the engine (profiles, observability, OpenAPI, reload)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from ..asgi._problem import CONTENT_TYPE, problem_bytes
from ..asgi.gate import gate_router
from ..config import Settings
from ..errors import ConfigError, Denial
from . import _fatal
from .engine import Engine, Hook, ServiceFactory, engine_start, engine_stop
from .observe import Observe
from .openapi import OpenAPI
from .profiles import Profiles
from .reload import Reload
from .services import default_services

log = logging.getLogger("policyroute")


def default_hooks(*, health: bool = False, metrics: bool = False) -> list[Hook]:
    """The features every installed engine has, in the order they attach."""
    return [Profiles(), Observe(health=health, metrics=metrics), OpenAPI(), Reload()]


async def _denial_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Denial)
    return Response(
        problem_bytes(exc, request.url.path),
        status_code=exc.status,
        headers=exc.headers,
        media_type=CONTENT_TYPE.decode(),
    )


def _wrap_lifespan(app: FastAPI, engine: Engine) -> None:
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(inner: Any) -> AsyncIterator[Any]:
        engine.check_strict()  # routes added between `install` and startup
        await engine_start(engine)
        try:
            async with original(inner) as state:
                yield state
        finally:
            await engine_stop(engine)

    app.router.lifespan_context = lifespan


def install(
    app: FastAPI,
    *paths: str | Path,
    strict: bool | None = None,
    settings: Settings | None = None,
    services: ServiceFactory | None = None,
    health: bool = False,
    metrics: bool = False,
) -> Engine:
    """Compile the policies and gate every route of `app`; return the engine.

    Routes no policy names answer 403 (deny by default); with `strict=True` they make
    `install` raise `ConfigError` instead. `health=True` adds `GET /healthz` and
    `GET /readyz`, `metrics=True` adds `GET /metrics`: the policy governs them like any
    other route (list them, e.g. `GET /healthz: {public: true}`).
    """
    if not isinstance(app, FastAPI):
        raise TypeError(
            f"policyroute.install governs a FastAPI app; got a {type(app).__name__} "
            "(a Starlette app or router can be mounted in a FastAPI app and governed there)"
        )
    config = settings or Settings()
    policy_paths = [str(p) for p in paths] or config.policy_paths()
    try:
        engine = Engine(
            app,
            policy_paths,
            config,
            strict=config.strict if strict is None else strict,
            services=services or default_services,
            hooks=default_hooks(health=health, metrics=metrics),
        )
        # Sanitized logs and health routes, the policy in /openapi.json, reload on change
        # and on SIGHUP: before the strict check, which must see the routes the hooks add.
        engine.attach()
        gate_router(app.router, engine.decider)
        engine.check_strict()
    except ConfigError as exc:
        _fatal.in_worker(exc)  # under `uvicorn --workers N` or `--reload`: findings, exit 3
        _fatal.briefly()  # uncaught, under `uvicorn app:app`: the findings, not a traceback
        raise
    for key in engine.unmatched_policies():
        log.warning("policyroute: policy %s matches no route of the app", key)
    app.add_exception_handler(Denial, _denial_handler)
    _wrap_lifespan(app, engine)
    app.state.policyroute = engine
    return engine
