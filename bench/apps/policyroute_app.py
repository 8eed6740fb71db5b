"""The handler behind ``policyroute.install`` with the policy set named by ``BENCH_POLICY``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

import policyroute
from bench.apps import PING_BODY, valkey_url

POLICIES = Path(__file__).resolve().parent.parent / "policies"
POLICY_DIR = POLICIES / os.environ.get("BENCH_POLICY", "core")

# policyroute reads its settings from the environment itself; fail early and
# clearly here when the harness did not set the backend.
valkey_url()

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    """Answer the benchmark request."""
    return PING_BODY


@contextlib.asynccontextmanager
async def fund_the_bench_subject(_: FastAPI) -> AsyncIterator[None]:
    """Give the bench subject enough credits for any run (the full chain charges 1 a call)."""
    store = engine.services.get("valkey")
    if store is not None:
        from policyroute.admin.credits import set_balance

        await set_balance(store, "bench-user", 10**12)
    yield


app.router.lifespan_context = fund_the_bench_subject
engine = policyroute.install(app, POLICY_DIR)
