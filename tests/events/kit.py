"""Shared pieces of the events tests: an app, its policies, and a real Pulsar listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pulsar
import pulsar.asyncio
import valkey.asyncio
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

import policyroute
from policyroute.engine.engine import Engine

QUIET = logging.getLogger("tests.pulsar")


def topic(name: str) -> str:
    """A topic no other test uses."""
    return f"persistent://public/default/{name}-{uuid.uuid4().hex[:10]}"


def dead_pulsar_url() -> str:
    """A pulsar:// URL on a loopback port nothing listens on (a broker that is away)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"pulsar://127.0.0.1:{port}"


def make_app(calls: dict[str, int]) -> FastAPI:
    """Handlers that answer as the query asks."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/jobs")
    async def jobs(request: Request, status: int = 201, sleep: float = 0.0) -> Response:
        calls["jobs"] = calls.get("jobs", 0) + 1
        body = await request.json()
        if sleep:
            await anyio.sleep(sleep)
        return JSONResponse(
            {"job": calls["jobs"], "echo": body, "internal": "not-in-events"}, status_code=status
        )

    @app.get("/who")
    async def who(
        principal: policyroute.Principal = Depends(policyroute.principal),
    ) -> dict[str, Any]:
        return {"subject": principal.subject}

    @app.post("/flaky")
    async def flaky(request: Request, fail: int = 0) -> Response:
        calls["flaky"] = calls.get("flaky", 0) + 1
        await request.json()
        if calls["flaky"] <= fail:
            return JSONResponse({"error": "try again"}, status_code=503)
        return JSONResponse({"done": calls["flaky"]}, status_code=201)

    @app.get("/big")
    async def big(size: int = 0) -> dict[str, Any]:
        return {"blob": "x" * size, "n": 1}

    return app


def install(
    policy_dir: Path,
    policy: str,
    *,
    valkey_url: str,
    pulsar_url: str,
    key_prefix: str | None = None,
    **settings: Any,
) -> tuple[FastAPI, Engine]:
    """An app gated by `policy`, with Valkey keys under a fresh prefix (unless given)."""
    (policy_dir / "routes.yaml").write_text(policy)
    app = make_app({})
    config = policyroute.Settings(
        valkey_url=valkey_url,
        pulsar_url=pulsar_url,
        key_prefix=key_prefix or "t" + uuid.uuid4().hex[:10],
        **settings,
    )
    engine = policyroute.install(app, policy_dir, settings=config)
    return app, engine


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Startup, a client from 127.0.0.1, shutdown (which flushes events)."""
    async with LifespanManager(app, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


class Listener:
    """A pulsar-client consumer on one topic, subscribed from the earliest message."""

    def __init__(self, url: str, topic: str) -> None:
        self.url = url
        self.topic = topic
        self.client: Any = None
        self.consumer: Any = None

    async def __aenter__(self) -> Listener:
        self.client = pulsar.asyncio.Client(self.url, logger=QUIET)
        self.consumer = await self.client.subscribe(
            self.topic,
            "test-listener",
            initial_position=pulsar.InitialPosition.Earliest,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.close()
        await self.client.close()

    async def take(self, count: int, wait: float = 10.0) -> list[Any]:
        """The next `count` messages (acknowledged); fewer if `wait` seconds pass first."""
        got: list[Any] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while len(got) < count:
                    message = await self.consumer.receive()
                    await self.consumer.acknowledge(message)
                    got.append(message)
        return got

    async def until(self, done: Any, wait: float) -> list[Any]:
        """Messages until `done(messages)` is true or `wait` seconds pass."""
        got: list[Any] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while not done(got):
                    message = await self.consumer.receive()
                    await self.consumer.acknowledge(message)
                    got.append(message)
        return got


async def outbox_entries(engine: Engine) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The raw entries of the app's outbox stream (read with a client of the test's own)."""
    store = engine.services["valkey"]
    client = valkey.asyncio.from_url(store.url)  # type: ignore[no-untyped-call]
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(
            store.key("outbox", "events")
        )
    finally:
        await client.aclose()
    return entries


async def eventually(check: Callable[[], bool], wait: float = 10.0) -> bool:
    """Poll `check` until it is true or `wait` seconds pass; its last value."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            while not check():  # noqa: ASYNC110 - polls state that has no event to wait on
                await asyncio.sleep(0.05)
    return check()


async def wait_for_outbox(engine: Engine, count: int, wait: float = 10.0) -> list[Any]:
    """Poll the outbox until it holds `count` entries."""
    entries: list[Any] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            while len(entries) < count:
                entries = await outbox_entries(engine)
                if len(entries) < count:
                    await asyncio.sleep(0.05)
    return entries


