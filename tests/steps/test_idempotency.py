"""idempotency: the 400/409/422/replay matrix of draft-ietf-httpapi-idempotency-key-header."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import httpx

from policyroute.admin import credits
from policyroute.errors import Problems
from tests.servers import uvicorn

from .stateful import client, engine, install, running

POLICY = """\
version: 1
routes:
  POST /jobs:
    public: true
    credits: {cost: 1}
    idempotency: {header: Idempotency-Key, ttl: 1s, required: true}
  POST /charge:
    public: true
    idempotency: {}
"""


async def test_missing_and_malformed_keys_are_400(policy_dir: Path, valkey_url: str) -> None:
    app = install(policy_dir, POLICY, valkey_url, Counter())
    async with running(app) as c:
        missing = await c.post("/jobs", json={"a": 1})
        bad = await c.post("/jobs", json={"a": 1}, headers={"Idempotency-Key": '"' + "x" * 300})
    assert missing.status_code == 400
    assert missing.json()["type"] == Problems.IDEMPOTENCY_KEY_MISSING.uri
    assert bad.status_code == 400
    assert bad.json()["type"] == Problems.IDEMPOTENCY_KEY_INVALID.uri


async def test_repeat_is_replayed_byte_for_byte_without_second_charge(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        store = engine(app).services["valkey"]
        await credits.grant(store, "127.0.0.1", 5, ip=True)
        key = {"Idempotency-Key": '"job-1"'}
        first = await c.post("/jobs", json={"a": 1}, headers=key)
        again = await c.post("/jobs", json={"a": 1}, headers=key)
        balance = await credits.show(store, "127.0.0.1", ip=True)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["x-job"] == first.headers["x-job"] == "1"
    assert again.headers["content-length"] == first.headers["content-length"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert calls["jobs"] == 1
    assert balance.total == 4


async def test_same_key_other_payload_is_422(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        await credits.grant(engine(app).services["valkey"], "127.0.0.1", 5, ip=True)
        key = {"Idempotency-Key": "k-422"}
        assert (await c.post("/jobs", json={"a": 1}, headers=key)).status_code == 201
        other = await c.post("/jobs", json={"a": 2}, headers=key)
    assert other.status_code == 422
    assert other.json()["type"] == Problems.IDEMPOTENCY_KEY_REUSED.uri
    assert calls["jobs"] == 1


async def test_duplicate_in_flight_is_409(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        await credits.grant(engine(app).services["valkey"], "127.0.0.1", 5, ip=True)
        key = {"Idempotency-Key": "k-409"}
        slow = asyncio.create_task(c.post("/jobs?sleep=0.3", json={"a": 1}, headers=key))
        await asyncio.sleep(0.1)
        dup = await c.post("/jobs?sleep=0.3", json={"a": 1}, headers=key)
        first = await slow
    assert first.status_code == 201
    assert dup.status_code == 409
    assert dup.json()["type"] == Problems.IDEMPOTENCY_IN_FLIGHT.uri
    assert calls["jobs"] == 1


async def test_key_is_scoped_to_the_caller_and_expires(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as a, client(app, "10.9.9.9") as b:
        store = engine(app).services["valkey"]
        await credits.grant(store, "127.0.0.1", 5, ip=True)
        await credits.grant(store, "10.9.9.9", 5, ip=True)
        key = {"Idempotency-Key": "shared-name"}
        assert (await a.post("/jobs", json={"a": 1}, headers=key)).status_code == 201
        theirs = await b.post("/jobs", json={"a": 1}, headers=key)
        assert theirs.status_code == 201
        assert "idempotent-replayed" not in theirs.headers
        await asyncio.sleep(1.1)  # ttl 1s: the record is gone, the key runs again
        assert (
            "idempotent-replayed" not in (await a.post("/jobs", json={"a": 1}, headers=key)).headers
        )
    assert calls["jobs"] == 3


async def test_server_error_is_not_stored(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        await credits.grant(engine(app).services["valkey"], "127.0.0.1", 5, ip=True)
        key = {"Idempotency-Key": "k-500"}
        assert (await c.post("/jobs?status=503", json={}, headers=key)).status_code == 503
        retry = await c.post("/jobs?status=503", json={}, headers=key)
        optional = await c.post("/charge")
    assert "idempotent-replayed" not in retry.headers
    assert calls["jobs"] == 2
    assert optional.status_code == 200  # optional key: no header, no record


async def test_replay_is_served_even_when_the_balance_is_spent(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        store = engine(app).services["valkey"]
        await credits.set_balance(store, "127.0.0.1", 1, ip=True)
        key = {"Idempotency-Key": '"spent-1"'}
        first = await c.post("/jobs", json={"a": 1}, headers=key)
        replay = await c.post("/jobs", json={"a": 1}, headers=key)
        fresh = await c.post("/jobs", json={"a": 1}, headers={"Idempotency-Key": '"spent-2"'})
        balance = await credits.show(store, "127.0.0.1", ip=True)
    assert first.status_code == 201, first.text
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert fresh.status_code == 402 and fresh.json()["balance"] == 0
    assert calls["jobs"] == 1 and balance.total == 0


async def test_a_retry_sent_right_after_the_response_is_a_replay_on_a_real_server(
    policy_dir: Path, valkey_url: str
) -> None:
    """The record is stored before the client sees the response end, never after."""
    (policy_dir / "routes.yaml").write_text(
        "version: 1\nroutes:\n  POST /jobs:\n    public: true\n    idempotency: {required: true}\n"
    )
    with uvicorn(policy_dir, valkey_url) as served:
        async with httpx.AsyncClient(base_url=served.base) as c:
            for n in range(20):
                key = {"Idempotency-Key": f"again-{n}-{uuid.uuid4().hex[:6]}"}
                first = await c.post("/jobs", json={"n": n}, headers=key)
                again = await c.post("/jobs", json={"n": n}, headers=key)
                assert first.status_code == 201
                assert again.status_code == 201, again.text
                assert again.headers["idempotent-replayed"] == "true"
                assert again.content == first.content
