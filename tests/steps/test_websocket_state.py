"""Stateful keys on a websocket route: a session is charged once accepted, and a limit that
watches for disconnects (a concurrency cap) leaves the handshake to the handler."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, WebSocket
from starlette.types import Message

import policyroute
from policyroute.admin.credits import set_balance, show
from policyroute.backends.valkey import ValkeyStore


def _app(policy_dir: Path, policy: str, valkey_url: str, hold: anyio.Event | None = None) -> Any:
    (policy_dir / "routes.yaml").write_text(policy)
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        if hold is not None:
            await hold.wait()
        await websocket.close()

    settings = policyroute.Settings(valkey_url=valkey_url, key_prefix="t" + uuid.uuid4().hex[:10])
    policyroute.install(app, policy_dir, settings=settings)
    return app


async def _session(app: Any) -> list[str]:
    """One websocket session from 127.0.0.1: what the server sent (closes with their code)."""
    inbox: list[Message] = [{"type": "websocket.connect"}]
    sent: list[str] = []

    async def receive() -> Message:
        if inbox:
            return inbox.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        kind = message["type"]
        sent.append(f"{kind}:{message['code']}" if kind == "websocket.close" else kind)

    scope = {
        "type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": "/ws",
        "raw_path": b"/ws", "query_string": b"", "root_path": "", "headers": [],
        "client": ("127.0.0.1", 40000), "server": ("t", 80), "subprotocols": [],
    }
    await app(scope, receive, send)
    return sent


CREDITS = """\
version: 1
routes:
  GET /ws:
    public: true
    credits: {cost: 1}
"""


async def test_an_accepted_websocket_session_is_charged(policy_dir: Path, valkey_url: str) -> None:
    """Two credits pay for two sessions; the third is refused (1008) and the balance is 0.
    (Sessions were refunded as if no response had been sent: every one ran for free.)"""
    app = _app(policy_dir, CREDITS, valkey_url)
    async with LifespanManager(app):
        store: ValkeyStore = app.state.policyroute.services["valkey"]
        await set_balance(store, "127.0.0.1", 2, ip=True)
        sessions = [await _session(app) for _ in range(3)]
        await store.settle()
        balance = await show(store, "127.0.0.1", ip=True)
    served = ["websocket.accept", "websocket.send", "websocket.close:1000"]
    assert sessions == [served, served, ["websocket.close:1008"]]
    assert (balance.total, balance.held) == (0, 0)


CONCURRENCY = """\
version: 1
routes:
  GET /ws:
    public: true
    rate_limit: {algorithm: concurrency, key: ip, capacity: 1}
"""


async def test_a_concurrency_cap_on_a_websocket_holds_one_session_at_a_time(
    policy_dir: Path, valkey_url: str
) -> None:
    """The handler gets the handshake (the cap once read it as a request body and every
    connection failed), a second session while the first is open is refused with 1008,
    and one after it ends is served."""
    hold = anyio.Event()
    app = _app(policy_dir, CONCURRENCY, valkey_url, hold)
    served = ["websocket.accept", "websocket.send", "websocket.close:1000"]
    async with LifespanManager(app):
        first: list[list[str]] = []
        async with anyio.create_task_group() as tasks:

            async def run_first() -> None:
                first.append(await _session(app))

            tasks.start_soon(run_first)
            await anyio.sleep(0.2)
            second = await _session(app)
            hold.set()
        third = await _session(app)
    assert first == [served]
    assert second == ["websocket.close:1008"]
    assert third == served
