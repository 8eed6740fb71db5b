"""The app the fault tests serve from real uvicorn workers: every answer names its caller.

`GET /mine/{item}` (a per-user cache; `?sleep=S` holds the handler), `GET /charge` (credits) and `GET /limited` (a
rate limit that fails closed) each answer `{"subject": ..., "route": ..., "made": ...}`
(`made` is new on each handler run, so a cached answer is recognisable). Every answer
carries `x-pid`, the worker process that gave it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import Depends, FastAPI

import policyroute
from tests.steps.identity_kit import SETTINGS
from tests.steps.stateful import tag_pid

# `credits.hold`: a reservation no commit settled is refunded after it (by the next charge).
HOLD = 1.0

POLICY = f"""\
version: 1
{SETTINGS}routes:
  GET /mine/{{item}}:
    cache: {{ttl: 1s}}
  GET /charge:
    credits: {{cost: 1, hold: {int(HOLD * 1000)}ms}}
  GET /limited:
    rate_limit: {{key: user, capacity: 1000000, per: 60s, on_backend_error: closed}}
"""


def make_app() -> FastAPI:
    """Handlers that answer with who called, which route, and a fresh token."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def answer(route: str, principal: policyroute.Principal) -> dict[str, Any]:
        return {"subject": principal.subject, "route": route, "made": uuid.uuid4().hex}

    @app.get("/mine/{item}")
    async def mine(
        item: str,
        sleep: float = 0.0,
        principal: policyroute.Principal = Depends(policyroute.principal),
    ) -> dict[str, Any]:
        if sleep:
            await asyncio.sleep(sleep)
        return {**answer("mine", principal), "item": item}

    @app.get("/charge")
    async def charge(
        principal: policyroute.Principal = Depends(policyroute.principal),
    ) -> dict[str, Any]:
        return answer("charge", principal)

    @app.get("/limited")
    async def limited(
        principal: policyroute.Principal = Depends(policyroute.principal),
    ) -> dict[str, Any]:
        return answer("limited", principal)

    return app


def worker_app() -> FastAPI:
    """The app for uvicorn workers (policies and Valkey from POLICYROUTE_*), tagged `x-pid`."""
    app = make_app()
    policyroute.install(app)
    return tag_pid(app)
