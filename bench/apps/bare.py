"""Baseline: the handler with nothing in front of it."""

from __future__ import annotations

from fastapi import FastAPI

from bench.apps import PING_BODY

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    """Answer the benchmark request."""
    return PING_BODY
