"""`request: {max_body, content_types}`: 413 and 415 problem+json before anything reads the
body, whether the client declares its length or streams it; and the default `max_body` of
the steps that read a body whole."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request
from pydantic import BaseModel

import policyroute
from policyroute.admin import credits
from policyroute.crypto import ENV, Keyring
from policyroute.errors import Problems

from .stateful import engine

POLICY = """\
version: 1
routes:
  POST /items:
    public: true
    request: {max_body: 1KiB, content_types: [application/json]}
    rate_limit: {key: ip, capacity: 100, per: 1m}
    credits: {cost: 1}
  POST /raw:
    public: true
    request: {max_body: 1KiB, content_types: [application/json, text/*]}
    credits: {cost: 1}
  POST /ignored:
    public: true
    idempotency: {}
  POST /big:
    public: true
    request: {max_body: 4KiB}
    idempotency: {}
  POST /people:
    public: true
    encrypt_fields: [ssn]
"""
JSON = {"content-type": "application/json"}


@pytest.fixture(autouse=True)
def data_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Data keys for the encrypt_fields route."""
    monkeypatch.setenv(ENV, Keyring.generate("k1"))


class Item(BaseModel):
    """A body FastAPI reads and validates before the endpoint runs."""

    text: str


def make_app(calls: Counter[str]) -> FastAPI:
    """A route whose body FastAPI reads, one whose endpoint reads it, one that never does."""
    app = FastAPI(openapi_url=None)

    @app.post("/items")
    async def items(item: Item) -> dict[str, int]:
        calls["items"] += 1
        return {"size": len(item.text)}

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, int]:
        calls["raw"] += 1
        return {"size": len(await request.body())}

    @app.post("/ignored")
    async def ignored() -> dict[str, bool]:
        calls["ignored"] += 1
        return {"ok": True}

    @app.post("/big")
    async def big(request: Request) -> dict[str, int]:
        calls["big"] += 1
        return {"size": len(await request.body())}

    @app.post("/people")
    async def people(request: Request) -> dict[str, Any]:
        calls["people"] += 1
        return {"keys": sorted(await request.json())}

    return app


@asynccontextmanager
async def serve(
    policy_dir: Path, valkey_url: str, calls: Counter[str], **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The app on real Valkey, its settings as given; 10 credits for 127.0.0.1."""
    (policy_dir / "routes.yaml").write_text(POLICY)
    app = make_app(calls)
    config = policyroute.Settings(
        valkey_url=valkey_url, key_prefix="b" + uuid.uuid4().hex[:10], **settings
    )
    policyroute.install(app, policy_dir, settings=config)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with LifespanManager(app), httpx.AsyncClient(
        transport=transport, base_url="http://t"
    ) as c:
        await credits.set_balance(engine(app).services["valkey"], "127.0.0.1", 10, ip=True)
        c.app = app  # type: ignore[attr-defined]
        yield c


async def balance(c: httpx.AsyncClient) -> int:
    """What 127.0.0.1 has left."""
    store = engine(c.app).services["valkey"]  # type: ignore[attr-defined]
    return (await credits.show(store, "127.0.0.1", ip=True)).total


def chunked(body: bytes, size: int = 256) -> AsyncIterator[bytes]:
    """The body as a stream of `size`-byte chunks (sent without a Content-Length)."""

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(body), size):
            yield body[i : i + size]

    return stream()


def item(size: int) -> bytes:
    """A JSON item whose encoding is `size` bytes."""
    return b'{"text": "' + b"x" * (size - 12) + b'"}'


def assert_problem(answer: httpx.Response, status: int, problem: Any) -> dict[str, Any]:
    """The answer is the problem+json of `problem`; its body."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert body["type"] == problem.uri
    return body


async def test_a_declared_length_over_max_body_is_413_before_anything_runs(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    async with serve(policy_dir, valkey_url, calls) as c:
        too_big = await c.post("/items", content=item(1025), headers=JSON)
        body = assert_problem(too_big, 413, Problems.BODY_TOO_LARGE)
        assert body["limit"] == 1024
        assert "1025 bytes" in body["detail"]
        assert (await c.post("/items", content=item(1024), headers=JSON)).status_code == 200
        assert await balance(c) == 9  # the 413 took no credit
        limits = (await c.post("/items", content=item(20), headers=JSON)).headers["ratelimit"]
    assert calls["items"] == 2
    assert "r=98" in limits  # nor a rate-limit token: 100, one per request that got in


@pytest.mark.parametrize("path", ["/items", "/raw"])
async def test_a_streamed_body_over_max_body_is_413_whoever_reads_it(
    policy_dir: Path, valkey_url: str, path: str
) -> None:
    calls: Counter[str] = Counter()
    async with serve(policy_dir, valkey_url, calls) as c:
        # FastAPI reads /items' body before its endpoint (and would answer 400 to a read
        # that fails); /raw's endpoint reads it itself. Either way the client sees 413.
        over = await c.post(path, content=chunked(item(1025)), headers=JSON)
        assert_problem(over, 413, Problems.BODY_TOO_LARGE)
        under = await c.post(path, content=chunked(item(1024)), headers=JSON)
        assert under.status_code == 200, under.text
        assert under.json()["size"] in (1012, 1024)
        assert await balance(c) == 9  # the refused request was not charged


async def test_a_content_type_not_listed_is_415(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    async with serve(policy_dir, valkey_url, calls) as c:
        plain = await c.post("/items", content=b"hello", headers={"content-type": "text/plain"})
        body = assert_problem(plain, 415, Problems.UNSUPPORTED_MEDIA_TYPE)
        assert body["accepted"] == ["application/json"]
        untyped = await c.post("/items", content=b"{}")
        assert_problem(untyped, 415, Problems.UNSUPPORTED_MEDIA_TYPE)
        streamed = await c.post("/items", content=chunked(b"hello"))
        assert_problem(streamed, 415, Problems.UNSUPPORTED_MEDIA_TYPE)
        # Parameters and case do not matter; a range takes every subtype.
        typed = {"content-type": "Application/JSON; charset=utf-8"}
        assert (await c.post("/items", content=item(20), headers=typed)).status_code == 200
        text = {"content-type": "text/csv"}
        assert (await c.post("/raw", content=b"a,b", headers=text)).status_code == 200
        # A request without a body has no type to check.
        assert (await c.post("/raw")).status_code == 200
        assert await balance(c) == 7  # the 415s took nothing
    assert calls == Counter({"items": 1, "raw": 2})


async def test_steps_that_read_the_body_whole_stop_at_the_default_max_body(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    async with serve(policy_dir, valkey_url, calls, max_body=2048) as c:
        key = {"idempotency-key": "k-1"}
        # The idempotency step reads the body to fingerprint it: 2 KiB (the setting) at most.
        declared = await c.post("/ignored", content=b"x" * 2049, headers=key)
        assert_problem(declared, 413, Problems.BODY_TOO_LARGE)
        streamed = await c.post("/ignored", content=chunked(b"x" * 2049), headers=key)
        assert_problem(streamed, 413, Problems.BODY_TOO_LARGE)
        assert (await c.post("/ignored", content=b"x" * 2048, headers=key)).status_code == 200
        # Without a key nothing reads the body; the handler takes what it likes.
        assert (await c.post("/ignored", content=b"x" * 4096)).status_code == 200
        # A route's own request.max_body is the limit of its steps too.
        big = await c.post("/big", content=chunked(b"x" * 4096), headers=key)
        assert (big.status_code, big.json()) == (200, {"size": 4096})
        over = await c.post("/big", content=chunked(b"x" * 4097), headers={"idempotency-key": "2"})
        assert_problem(over, 413, Problems.BODY_TOO_LARGE)
        # encrypt_fields parses the body to seal fields: the same default.
        person = b'{"ssn": "' + b"1" * 2040 + b'"}'
        assert_problem(await c.post("/people", content=person, headers=JSON), 413,
                       Problems.BODY_TOO_LARGE)  # fmt: skip
        sealed = await c.post("/people", json={"ssn": "123", "name": "a"})
        assert sealed.json() == {"keys": ["name", "ssn"]}
    assert calls == Counter({"ignored": 2, "big": 1, "people": 1})
