"""The bare handler plus 1 ms of awaited I/O: what a cache hit has to beat."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from bench.apps import PING_BODY

SLEEP_S = 0.001

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    """Wait 1 ms, then answer the benchmark request."""
    await asyncio.sleep(SLEEP_S)
    return PING_BODY
