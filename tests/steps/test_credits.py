"""credits: atomic reservation, 402, refunds, allowance, and the grant/show API and CLI."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

import policyroute
from policyroute.admin import credits
from policyroute.backends.valkey import ValkeyStore
from policyroute.cli import main
from policyroute.compile.step import Context
from policyroute.errors import Problems
from policyroute.language.policy import Credits
from policyroute.steps.credits import CreditsStep
from policyroute.steps.parts import Outcome
from policyroute.steps.parts import Request as StateRequest
from policyroute.steps.slots import run_state, state_reply

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
    valkey_url: str,
    policy_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (policy_dir / "routes.yaml").write_text(POLICY)
    monkeypatch.setenv("POLICYROUTE_POLICIES", str(policy_dir))
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", valkey_url)
    monkeypatch.setenv("POLICYROUTE_KEY_PREFIX", "cli-credits")
    assert main(["credits", "set", "alice", "0"]) == 0
    assert main(["credits", "grant", "alice", "25"]) == 0
    assert main(["credits", "grant", "alice", "-5"]) == 0
    capsys.readouterr()
    assert main(["credits", "show", "alice"]) == 0
    assert capsys.readouterr().out.strip() == "alice: balance 20"
    assert main(["credits", "grant", "alice"]) == 2
    # One issuer (or none) and no tenant claim: the account keeps its short key, so the
    # balances granted before the keys knew issuers are where the routes look.
    async def stored() -> object:
        store = ValkeyStore(valkey_url)
        try:
            return await store.command("HGET", "cli-credits:{s:alice}:credits", "b",
                                       operation="test")
        finally:
            await store.stop()

    assert asyncio.run(stored()) == b"20"


def test_cli_without_valkey_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLICYROUTE_VALKEY_URL", raising=False)
    assert main(["credits", "show", "alice"]) == 2


class Item(BaseModel):
    """The body the validated routes expect."""

    n: int


UNRUN_POLICY = """\
version: 1
routes:
  POST /items:
    public: true
    credits: {cost: 1}
  POST /sync-items:
    public: true
    credits: {cost: 1}
  POST /v1/included:
    public: true
    credits: {cost: 1}
  GET /guarded:
    public: true
    credits: {cost: 1}
  GET /plain:
    public: true
    credits: {cost: 1}
  GET /owned:
    public: true
    credits: {cost: 1, refund_on: [4xx]}
"""


def validating_app(calls: Counter[str]) -> FastAPI:
    """FastAPI routes that validate before their endpoint runs, and a plain Starlette route."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/items")
    async def items(item: Item, q: int = 0, status: int = 200) -> Response:
        calls["items"] += 1
        return JSONResponse({"n": item.n}, status_code=status)

    @app.post("/sync-items")
    def sync_items(item: Item, status: int = 200) -> Response:
        calls["sync-items"] += 1
        return JSONResponse({"n": item.n}, status_code=status)

    router = APIRouter(prefix="/v1")

    @router.post("/included")
    async def included(item: Item, status: int = 200) -> Response:
        calls["included"] += 1
        return JSONResponse({"n": item.n}, status_code=status)

    app.include_router(router)

    def refuse(allow: bool = False) -> None:
        if not allow:
            raise HTTPException(403, "refused by a dependency")

    @app.get("/guarded", dependencies=[Depends(refuse)])
    async def guarded() -> dict[str, bool]:
        calls["guarded"] += 1
        return {"ok": True}

    @app.get("/owned")
    async def owned(status: int = 200) -> Response:
        calls["owned"] += 1
        return JSONResponse({}, status_code=status)

    async def plain(request: Request) -> Response:
        calls["plain"] += 1
        return PlainTextResponse("gone", status_code=int(request.query_params.get("status", 200)))

    app.router.routes.append(Route("/plain", plain, methods=["GET"]))
    return app


async def test_a_request_refused_before_the_endpoint_ran_is_not_charged(
    policy_dir: Path, valkey_url: str
) -> None:
    (policy_dir / "routes.yaml").write_text(UNRUN_POLICY)
    calls: Counter[str] = Counter()
    app = validating_app(calls)
    settings = policyroute.Settings(valkey_url=valkey_url, key_prefix="t" + uuid.uuid4().hex[:10])
    policyroute.install(app, policy_dir, settings=settings)
    json_type = {"content-type": "application/json"}
    async with running(app) as c:
        store = store_of(app)
        await credits.grant(store, "127.0.0.1", 20, ip=True)

        async def balance() -> int:
            return (await credits.show(store, "127.0.0.1", ip=True)).total

        refused = [
            await c.post("/items", content=b'{"n": "x"}', headers=json_type),  # bad field
            await c.post("/items", content=b'{"n":', headers=json_type),  # JSON cut short
            await c.post("/items", json={"n": 1}, params={"q": "x"}),  # bad query parameter
            await c.post("/items", content=b'{"n": "\xff"}', headers=json_type),  # not UTF-8
            await c.post("/sync-items", content=b'{"n": "x"}', headers=json_type),
            await c.post("/v1/included", content=b"{}", headers=json_type),
            await c.get("/guarded"),  # a dependency refused it
        ]
        assert [r.status_code for r in refused] == [422, 422, 422, 400, 422, 422, 403]
        assert await balance() == 20
        assert sum(calls.values()) == 0

        # Endpoints that ran are charged, whatever they answered (4xx is not in refund_on).
        assert (await c.post("/items", json={"n": 1})).status_code == 200
        assert (await c.post("/items?status=404", json={"n": 1})).status_code == 404
        assert (await c.post("/sync-items", json={"n": 1})).status_code == 200
        assert (await c.post("/sync-items?status=409", json={"n": 1})).status_code == 409
        assert (await c.post("/v1/included", json={"n": 1})).status_code == 200
        assert (await c.post("/v1/included?status=404", json={"n": 1})).status_code == 404
        assert (await c.get("/guarded?allow=true")).status_code == 200
        assert (await c.get("/plain?status=404")).status_code == 404  # a Starlette route
        assert (await c.get("/plain")).status_code == 200
        assert await balance() == 11
        assert (await c.get("/owned?status=404")).status_code == 404  # refund_on lists 4xx
        assert (await c.get("/owned")).status_code == 200
        assert await balance() == 10
    assert calls == Counter(
        {"items": 2, "sync-items": 2, "included": 2, "guarded": 1, "plain": 2, "owned": 2}
    )


LONG_POLICY = """\
version: 1
routes:
  GET /charge:
    public: true
    credits: {cost: 1, hold: 400ms}
"""


async def test_a_request_running_longer_than_the_hold_keeps_it_and_pays_once(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, LONG_POLICY, valkey_url, calls)
    async with running(app) as c:
        store = store_of(app)
        await credits.set_balance(store, "127.0.0.1", 2, ip=True)
        long = asyncio.create_task(c.get("/charge?sleep=1.5"))  # runs ~4 holds
        await asyncio.sleep(0.9)
        # The long request still holds its credit: one is left, then none.
        assert (await c.get("/charge")).status_code == 200
        assert (await c.get("/charge")).status_code == 402
        assert (await long).status_code == 200
        balance = await credits.show(store, "127.0.0.1", ip=True)
    # Two paid calls moved the balance by two.
    assert (balance.total, balance.held) == (0, 0)
    assert calls["charge"] == 2


def _context() -> Context:
    scope = {"type": "http", "method": "GET", "headers": [], "client": ("127.0.0.1", 1)}

    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Message) -> None:
        raise AssertionError("not called")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("not called")

    return Context(scope, receive, send, "GET /charge", app)


async def _reserve(store: ValkeyStore, step: CreditsStep) -> StateRequest:
    """The step's before-handler op, run as the state step runs it."""
    req = StateRequest(_context(), token=uuid.uuid4().hex)
    step.prepare(req)
    raw = await run_state(store, req, "test", False)
    reply = state_reply(raw)
    req.data["verdict"] = reply[0]
    step.settle(req, reply)
    return req


async def _commit(store: ValkeyStore, step: CreditsStep, req: StateRequest) -> None:
    """The after-handler ops of a request that succeeded, as the step queues them."""
    req.finish_keys.clear()
    req.finish_args.clear()
    req.finish_marks.clear()
    step.after(req, Outcome(handler_ran=True, status=200, started=True, done=True))
    await store.run("finish", req.finish_keys, req.finish_args, operation="test", fail_open=False)


async def test_a_commit_whose_hold_was_swept_charges_once_even_when_run_twice(
    valkey_url: str,
) -> None:
    store = ValkeyStore(valkey_url, prefix="t" + uuid.uuid4().hex[:10])
    # The step's own ops, run as the state step runs them: one reservation whose hold
    # runs out at once (its process stalled), one held for a minute.
    stalled = CreditsStep(store, Credits(cost=1, hold=0.001))
    steady = CreditsStep(store, Credits(cost=1, hold=60))

    async def reserve(step: CreditsStep) -> StateRequest:
        return await _reserve(store, step)

    async def commit(step: CreditsStep, req: StateRequest) -> None:
        """The after-handler ops of a request that succeeded, as the step queues them."""
        await _commit(store, step, req)

    try:
        await credits.set_balance(store, "127.0.0.1", 5, ip=True)
        lost = await reserve(stalled)
        await asyncio.sleep(0.01)
        second = await reserve(steady)  # this charge sweeps (refunds) the lost hold
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 4
        # The stalled request finishes after all: its commit charges, once however often
        # the store sends it (a call that met no server is sent again).
        await commit(stalled, lost)
        await commit(stalled, lost)
        await commit(steady, second)
        await commit(steady, second)
        balance = await credits.show(store, "127.0.0.1", ip=True)
        assert (balance.total, balance.held) == (3, 0)
    finally:
        await stalled.stop()
        await steady.stop()
        await store.stop()


async def test_a_charge_searches_the_held_reservations_only_once_they_may_have_expired(
    valkey_url: str,
) -> None:
    """The account keeps a bound before which no hold expires: charges before it skip the
    search of the held set, and the first charge after a stalled hold's expiry still finds
    it and refunds it."""
    store = ValkeyStore(valkey_url, prefix="t" + uuid.uuid4().hex[:10])
    steady = CreditsStep(store, Credits(cost=1, hold=60))
    stalled = CreditsStep(store, Credits(cost=1, hold=0.05))

    async def searches() -> int:
        stats = await store.command("INFO", "commandstats", operation="test")
        text = stats.decode() if isinstance(stats, bytes) else str(stats)
        for line in text.splitlines():
            if line.startswith("cmdstat_zrangebyscore:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0

    async def charge(step: CreditsStep, *, settle: bool = True) -> StateRequest:
        req = await _reserve(store, step)
        if settle:
            await _commit(store, step, req)
        return req

    try:
        await credits.set_balance(store, "127.0.0.1", 100, ip=True)
        before = await searches()
        for _ in range(10):
            await charge(steady)
        # The first charge found no bound (the account was just set): one search in ten.
        assert await searches() - before == 1
        await charge(stalled, settle=False)  # its process stalls: the hold is never settled
        stalled.live.clear()  # ... nor renewed
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 89
        await charge(steady)  # before the stalled hold expires: no search, no refund
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 88
        await asyncio.sleep(0.1)
        before = await searches()
        await charge(steady)  # the bound has passed: this charge searches and refunds
        assert await searches() - before == 1
        balance = await credits.show(store, "127.0.0.1", ip=True)
        assert (balance.total, balance.held) == (88, 0)
    finally:
        await steady.stop()
        await stalled.stop()
        await store.stop()
