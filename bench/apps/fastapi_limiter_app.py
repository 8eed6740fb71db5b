"""The handler behind fastapi-limiter 0.2.0, a pyrate-limiter bucket in Valkey.

fastapi-limiter 0.2.0 is a thin dependency over ``pyrate_limiter.Limiter``.
``RedisBucket.init`` with an asyncio client returns a coroutine and ``Limiter``
starts its leak task with ``asyncio.create_task``, so both are built in the
lifespan, where a loop runs, and the route is registered there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi_limiter.depends import RateLimiter
from pyrate_limiter import Duration, Limiter, Rate, RedisBucket
from valkey.asyncio import Valkey

from bench.apps import PING_BODY, valkey_url

LIMIT = Rate(1_000_000, Duration.MINUTE)
BUCKET_KEY = "bench:fastapi_limiter"


async def ping() -> dict[str, bool]:
    """Answer the benchmark request."""
    return PING_BODY


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Connect to Valkey, build the limiter and register the limited route."""
    client = Valkey.from_url(valkey_url())
    bucket = await RedisBucket.init([LIMIT], client, BUCKET_KEY)
    limiter = Limiter(bucket)
    app.add_api_route(
        "/ping", ping, methods=["GET"], dependencies=[Depends(RateLimiter(limiter=limiter))]
    )
    try:
        yield
    finally:
        limiter.close()
        await client.aclose()


app = FastAPI(lifespan=lifespan)
