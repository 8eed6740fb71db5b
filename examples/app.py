"""The io-job service: plain handlers; every guard comes from examples/policies/.

Besides the io-job and user-profile routes there is one route per policy feature, so
`make demo` (examples/demo.py) and the README walkthrough can show each denial and
success. The handlers know nothing of tokens, limits, credits, caches, retries or
events: delete a key from the policy and its behaviour is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import policyroute

HERE = Path(__file__).resolve().parent
POLICIES = HERE / "policies"
# DEV ONLY: a published data key, so sealed fields work out of the box. Production sets
# POLICYROUTE_DATA_KEYS (which wins over this file) or its own POLICYROUTE_DATA_KEYS_FILE.
DEV_DATA_KEY = HERE / "keys" / "dev-data-key.txt"

app = FastAPI(title="io-job example")
Who = policyroute.Principal

# In-memory state of the example handlers (one process, nothing durable).
served: Counter[str] = Counter()
attempts: Counter[str] = Counter()
notes: dict[str, dict[str, Any]] = {}
next_id = itertools.count(1)


class IORequest(BaseModel):
    """What a caller asks the io-job endpoint to fetch."""

    resource_id: str
    query_params: dict[str, Any] = {}


async def heavy_async_io_function(resource_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """Stands in for slow outbound IO."""
    await asyncio.sleep(0.05)
    return {"resource_id": resource_id, "params": params, "data": "fetched_data"}


@app.post("/io-job")
async def run_io_job(req: IORequest, who: Who = Depends(policyroute.principal)) -> dict[str, Any]:
    """Run one io job for the caller."""
    result = await heavy_async_io_function(req.resource_id, req.query_params)
    return {"result": result, "subject": who.subject}


@app.get("/user/{user_id}")
async def get_user_profile(
    user_id: str, who: Who = Depends(policyroute.principal)
) -> dict[str, Any]:
    """A user's profile (`served` counts handler runs: a cache hit does not run it)."""
    served["user"] += 1
    return {
        "user_id": user_id,
        "profile": "user_profile_data",
        "viewer": who.subject,
        "served": served["user"],
    }


@app.get("/health")
async def health() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


# --- one route per feature ------------------------------------------------------------


@app.get("/admin/report")
async def admin_report() -> dict[str, str]:
    """roles: only admins."""
    return {"report": "quarterly"}


@app.get("/internal/status")
async def internal_status() -> dict[str, str]:
    """ip_allowlist: only the internal network (and X-Forwarded-For only from proxies)."""
    return {"status": "internal"}


class Payout(BaseModel):
    """A payout request."""

    amount: int


@app.post("/payouts")
async def payout(body: Payout, who: Who = Depends(policyroute.principal)) -> dict[str, Any]:
    """mfa with TOTP: a fresh one-time code, accepted once."""
    return {"paid": body.amount, "to": who.subject}


@app.get("/search")
async def search(q: str = "") -> dict[str, Any]:
    """rate_limit, sliding window per user."""
    return {"q": q, "hits": []}


@app.get("/reports/render")
async def render_report() -> dict[str, str]:
    """rate_limit, concurrency: one render per user at a time."""
    await asyncio.sleep(0.3)
    return {"rendered": "report.pdf"}


@app.get("/status")
async def status() -> dict[str, str]:
    """public, with a limit per client address."""
    return {"status": "ok"}


@app.get("/catalog")
async def catalog() -> dict[str, Any]:
    """cache shared by every caller (acknowledged: the catalog is the same for everyone)."""
    served["catalog"] += 1
    return {"items": ["disk", "tape"], "served": served["catalog"]}


class Order(BaseModel):
    """An order."""

    item: str
    quantity: int


@app.post("/orders", status_code=201)
async def create_order(order: Order) -> dict[str, Any]:
    """events: each created order is published on Pulsar."""
    return {"order_id": f"o-{next(next_id)}", "item": order.item, "quantity": order.quantity}


ERROR_BODY: dict[str, Any] = {
    "description": "The handler's own error answer",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


@app.post("/sync", responses={503: ERROR_BODY})
async def sync(request: Request) -> JSONResponse:
    """retry: fails twice per Idempotency-Key, then succeeds (the retries happen inside)."""
    key = request.headers.get("idempotency-key", "")
    attempts[key] += 1
    if not key or attempts[key] < 3:
        return JSONResponse({"error": "upstream busy"}, status_code=503)
    return JSONResponse({"synced": True, "attempts": attempts[key]})


@app.get("/upstream", responses={502: ERROR_BODY})
async def upstream(fail: bool = False) -> JSONResponse:
    """breaker: failures open the circuit; then requests are refused without running this."""
    if fail:
        return JSONResponse({"error": "upstream failed"}, status_code=502)
    return JSONResponse({"upstream": "ok"})


@app.get("/slow")
async def slow(seconds: float = 0.0) -> dict[str, float]:
    """timeout: the handler gets one second."""
    await asyncio.sleep(min(seconds, 5.0))
    return {"slept": seconds}


async def fetch_stock(sku: str) -> int:
    """An outbound call that is refused the first time (a flaky inventory backend)."""
    attempts["stock:" + sku] += 1
    if attempts["stock:" + sku] == 1:
        raise ConnectionError("inventory backend refused the connection")
    return 7


@app.get("/inventory/{sku}")
async def inventory(sku: str) -> dict[str, Any]:
    """resilience profile `inventory_backend`: its retry covers a refused connection.

    The same profile can guard any coroutine: `@policyroute.resilient("inventory_backend")`.
    """
    stock = await fetch_stock(sku)
    return {"sku": sku, "stock": stock, "calls": attempts["stock:" + sku]}


class Note(BaseModel):
    """A note with a secret field."""

    title: str
    secret: str


@app.post("/notes", status_code=201)
async def create_note(note: Note) -> dict[str, str]:
    """encrypt_fields: `secret` arrives (and is stored) sealed."""
    note_id = f"n-{next(next_id)}"
    notes[note_id] = note.model_dump()
    return {"note_id": note_id}


@app.get("/notes/{note_id}", responses={404: ERROR_BODY})
async def read_note(note_id: str) -> JSONResponse:
    """decrypt_fields and sensitive: `secret` leaves opened; the cached copy stays sealed."""
    note = notes.get(note_id)
    if note is None:
        return JSONResponse({"error": "no such note"}, status_code=404)
    return JSONResponse({"note_id": note_id, **note})


@app.get("/notes/{note_id}/stored")
async def stored_note(note_id: str) -> dict[str, Any]:
    """What the handler holds: the sealed token, never the secret."""
    return {"note_id": note_id, **notes.get(note_id, {})}


class Transfer(BaseModel):
    """A transfer, authorised by a one-time token."""

    amount: int


@app.post("/transfers", status_code=201)
async def transfer(body: Transfer, who: Who = Depends(policyroute.principal)) -> dict[str, Any]:
    """replay: jti: each token runs one transfer; the same token again is refused."""
    return {"transfer_id": f"t-{next(next_id)}", "amount": body.amount, "by": who.subject}


@app.get("/export")
async def export() -> dict[str, float]:
    """throttle: a burst waits its turn and leaves at a steady rate (the time it left)."""
    return {"started": time.time()}


class Feedback(BaseModel):
    """A feedback form."""

    text: str


@app.post("/feedback", status_code=201)
async def feedback(body: Feedback) -> dict[str, Any]:
    """debounce, refuse: a double submit of the same form within 3 s is refused."""
    served["feedback"] += 1
    return {"received": body.text, "n": served["feedback"]}


@app.post("/reports/generate")
async def generate_report() -> dict[str, str]:
    """debounce, join: repeats while a report is generated get that same report."""
    await asyncio.sleep(0.3)
    return {"report_id": f"r-{next(next_id)}"}


engine = policyroute.install(
    app, POLICIES, settings=policyroute.Settings(data_keys_file=DEV_DATA_KEY)
)
