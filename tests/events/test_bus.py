"""The event bus of a served app: a process that stops while its broker is away."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from policyroute.backends.valkey import ValkeyStore
from policyroute.events.outbox import Outbox
from tests.servers import policyroute_run

from .kit import dead_pulsar_url, topic

SERVED_APP = """\
from fastapi import FastAPI, Request

import policyroute

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@app.post("/jobs", status_code=201)
async def jobs(request: Request) -> dict[str, object]:
    return {"job": await request.json()}


policyroute.install(app)
"""

EVENTS = 5


@pytest.mark.parametrize(
    ("stop", "code"),
    [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 0)],
    ids=["SIGTERM", "SIGINT"],
)
async def test_policyroute_run_with_an_unreachable_broker_stops_normally_and_keeps_its_events(
    tmp_path: Path, valkey_url: str, stop: signal.Signals, code: int
) -> None:
    # The native client retries its connections, and the producer of the route's topic is
    # still being created, when the signal comes. The process must end as with the
    # embedded backends (never SIGABRT: "terminate called without an active exception"),
    # and every event stays in the Valkey outbox for the next process's relay.
    (tmp_path / "served_jobs.py").write_text(SERVED_APP)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "routes.yaml").write_text(
        "version: 1\nroutes:\n  GET /ping:\n    public: true\n  POST /jobs:\n    public: true\n"
        f"    events: {{topic: '{topic('unreachable')}', fields: {{request: [n]}}}}\n"
    )
    prefix = "t" + uuid.uuid4().hex[:10]
    env = {
        "POLICYROUTE_KEY_PREFIX": prefix,
        "POLICYROUTE_EVENTS_SEND_TIMEOUT": "1",
        "POLICYROUTE_EVENTS_FLUSH_TIMEOUT": "1",
    }

    def serve_then_stop() -> tuple[list[int], int, str]:
        with policyroute_run(
            tmp_path, "served_jobs:app", policies, valkey_url, dead_pulsar_url(), env, "/ping"
        ) as run:
            statuses = [
                httpx.post(
                    f"{run.base}/jobs", json={"n": n}, headers={"X-Request-Id": f"r{n}"}
                ).status_code
                for n in range(EVENTS)
            ]
            run.proc.send_signal(stop)
            returncode = run.proc.wait(timeout=15)
        return statuses, returncode, run.log.read_text(errors="replace")

    statuses, returncode, output = await asyncio.to_thread(serve_then_stop)
    assert statuses == [201] * EVENTS
    assert "terminate called" not in output, output[-3000:]
    assert returncode == code, output[-3000:]
    assert "they are lost" not in output, output[-3000:]
    store = ValkeyStore(valkey_url, prefix=prefix)
    try:
        entries = await store.client.xrange(Outbox(store).key)
    finally:
        await store.stop()
    events = [json.loads(json.loads(fields[b"event"])["payload"]) for _, fields in entries]
    assert sorted(e["request_id"] for e in events) == [f"r{n}" for n in range(EVENTS)]
