"""Helpers for testing your own handlers behind their policies."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from .errors import PolicyrouteError


@contextlib.asynccontextmanager
async def client(
    app: FastAPI, *, client_address: str = "127.0.0.1", base_url: str = "http://testserver"
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client wired to `app` in-process, with its lifespan (backends) running."""
    try:
        from asgi_lifespan import LifespanManager
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PolicyrouteError(
            "policyroute.testing needs asgi-lifespan: pip install asgi-lifespan"
        ) from exc
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=(client_address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as c:
            yield c
