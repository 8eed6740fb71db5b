"""credits: atomic reservation, 402, refunds, allowance, and the grant/show API and CLI."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from fastapi import FastAPI

from policyroute import credits
from policyroute.backends.valkey import ValkeyStore
from policyroute.cli import main
from policyroute.errors import Problems

from .stateful import engine, install, running

POLICY = """\
version: 1
routes:
  POST /charge:
    public: true
    credits: {cost: 3}
  GET /charge:
    public: true
    credits: {cost: 1, refund_on: [5xx, 4xx, timeout, error, disconnect]}
  GET /limited:
    public: true
    credits: {cost: 2, allowance: {amount: 5, every: month}}
"""


def store_of(app: FastAPI) -> ValkeyStore:
    """The app's Valkey store."""
    found: ValkeyStore = engine(app).services["valkey"]
    return found


async def test_402_states_cost_and_balance_and_takes_nothing(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        store = store_of(app)
        await credits.grant(store, "127.0.0.1", 5, ip=True)
        first = await c.post("/charge")
        second = await c.post("/charge")
        balance = await credits.show(store, "127.0.0.1", ip=True)
    assert first.status_code == 200
    assert second.status_code == 402
    assert second.headers["content-type"] == "application/problem+json"
    body = second.json()
    assert body["type"] == Problems.INSUFFICIENT_CREDITS.uri
    assert (body["cost"], body["balance"]) == (3, 2)
    assert balance.total == 2  # a cost larger than the balance deducts nothing
    assert calls["charge"] == 1


async def test_refund_on_failure_commit_on_success(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        store = store_of(app)
        await credits.grant(store, "127.0.0.1", 10, ip=True)
        assert (await c.post("/charge?status=500")).status_code == 500
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 10
        assert (await c.post("/charge?status=404")).status_code == 404  # 4xx not refunded here
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 7
        with pytest.raises(RuntimeError):
            await c.post("/charge?status=599")
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 7
        assert (await c.get("/charge?status=404")).status_code == 404  # refund_on lists 4xx
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 7
        assert (await c.get("/charge")).status_code == 200
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 6


async def test_concurrent_requests_never_overdraw(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        store = store_of(app)
        await credits.grant(store, "127.0.0.1", 10, ip=True)
        answers = await asyncio.gather(*(c.get("/charge") for _ in range(40)))
        left = await credits.show(store, "127.0.0.1", ip=True)
    statuses = Counter(r.status_code for r in answers)
    assert statuses == Counter({200: 10, 402: 30})
    assert left.total == 0
    assert calls["charge"] == 10


async def test_allowance_resets_each_period(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        store = store_of(app)
        statuses = [(await c.get("/limited")).status_code for _ in range(3)]
        assert statuses == [200, 200, 402]
        left = await credits.show(store, "127.0.0.1", ip=True)
        assert (left.allowance, left.granted) == (1, 0)
        # A new period (simulated by forgetting the period marker) restores the allowance.
        key = credits.balance_key(store, credits.account_tag("127.0.0.1", ip=True))
        await store.command("HSET", key, "p", "0", operation="test")
        assert (await c.get("/limited")).status_code == 200
        assert (await credits.show(store, "127.0.0.1", ip=True)).allowance == 3


def test_cli_grants_and_shows(
    valkey_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", valkey_url)
    monkeypatch.setenv("POLICYROUTE_KEY_PREFIX", "cli-credits")
    assert main(["credits", "set", "alice", "0"]) == 0
    assert main(["credits", "grant", "alice", "25"]) == 0
    assert main(["credits", "grant", "alice", "-5"]) == 0
    capsys.readouterr()
    assert main(["credits", "show", "alice"]) == 0
    assert capsys.readouterr().out.strip() == "alice: balance 20"
    assert main(["credits", "grant", "alice"]) == 2


def test_cli_without_valkey_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLICYROUTE_VALKEY_URL", raising=False)
    assert main(["credits", "show", "alice"]) == 2
