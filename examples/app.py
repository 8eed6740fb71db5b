"""The io-job service: plain handlers; every guard comes from examples/policies/."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel

import policyroute

POLICIES = Path(__file__).resolve().parent / "policies"

app = FastAPI(title="io-job example")


class IORequest(BaseModel):
    """What a caller asks the io-job endpoint to fetch."""

    resource_id: str
    query_params: dict[str, Any] = {}


async def heavy_async_io_function(resource_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """Stands in for slow outbound IO."""
    await asyncio.sleep(0.05)
    return {"resource_id": resource_id, "params": params, "data": "fetched_data"}


@app.post("/io-job")
async def run_io_job(
    req: IORequest, who: policyroute.Principal = Depends(policyroute.principal)
) -> dict[str, Any]:
    """Run one io job for the caller."""
    result = await heavy_async_io_function(req.resource_id, req.query_params)
    return {"result": result, "subject": who.subject}


@app.get("/user/{user_id}")
async def get_user_profile(
    user_id: str, who: policyroute.Principal = Depends(policyroute.principal)
) -> dict[str, Any]:
    """A user's profile."""
    return {"user_id": user_id, "profile": "user_profile_data", "viewer": who.subject}


@app.get("/health")
async def health() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


engine = policyroute.install(app, POLICIES)
