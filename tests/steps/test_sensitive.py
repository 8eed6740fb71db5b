"""Sensitive routes: only ciphertext at rest in Valkey; sealed and opened JSON fields."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import valkey.asyncio as avalkey
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request

import policyroute
from policyroute.crypto import ENV, Keyring
from policyroute.errors import ConfigError, Problems

CANARY = "canary-7d1f-secret"
K1 = Keyring.generate("k1")
K2 = Keyring.generate("k2")

POLICY = """\
version: 1
routes:
  POST /notes:
    public: true
    sensitive: true
    idempotency: {required: true}
  GET /notes/{note}:
    public: true
    sensitive: true
    cache: {ttl: 60s}
  POST /people:
    public: true
    encrypt_fields: [ssn, address.street]
  GET /people/{pid}:
    public: true
    decrypt_fields: [ssn, address.street]
"""


def make_app(db: dict[str, Any]) -> FastAPI:
    """Handlers that echo secrets and keep what they are given, as a real service would."""
    app = FastAPI(openapi_url=None)

    @app.post("/notes")
    async def add_note(request: Request) -> dict[str, Any]:
        return {"saved": await request.json(), "secret": CANARY}

    @app.get("/notes/{note}")
    async def note(note: str) -> dict[str, str]:
        db["reads"] = db.get("reads", 0) + 1
        return {"note": note, "secret": CANARY}

    @app.post("/people")
    async def add_person(request: Request) -> dict[str, str]:
        person = await request.json()
        db[person["name"]] = person  # stored exactly as the handler received it
        return {"id": person["name"]}

    @app.get("/people/{pid}")
    async def person(pid: str) -> dict[str, Any]:
        found: dict[str, Any] = db[pid]
        return found

    return app


@asynccontextmanager
async def serve(
    policy_dir: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch, keys: str = K1
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, Any], str]]:
    """The app on real Valkey with data keys from the environment: (client, db, prefix)."""
    monkeypatch.setenv(ENV, keys)
    (policy_dir / "routes.yaml").write_text(POLICY)
    db: dict[str, Any] = {}
    app = make_app(db)
    prefix = "z" + uuid.uuid4().hex[:10]
    settings = policyroute.Settings(valkey_url=valkey_url, key_prefix=prefix)
    policyroute.install(app, policy_dir, settings=settings)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with LifespanManager(app), httpx.AsyncClient(
        transport=transport, base_url="http://t"
    ) as c:
        yield c, db, prefix


async def _everything_stored(valkey_url: str, prefix: str) -> bytes:
    """Every key and value under a prefix, concatenated."""
    client = avalkey.from_url(valkey_url)  # type: ignore[no-untyped-call]
    out = b""
    try:
        async for key in client.scan_iter(match=prefix + ":*"):
            out += key
            kind = await client.type(key)
            if kind == b"hash":
                for field, value in (await client.hgetall(key)).items():
                    out += field + value
            elif kind == b"string":
                out += await client.get(key) or b""
            elif kind == b"zset":
                out += b"".join(await client.zrange(key, 0, -1))
    finally:
        await client.aclose()
    return out


async def test_only_ciphertext_of_a_sensitive_route_reaches_valkey(
    policy_dir: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve(policy_dir, valkey_url, monkeypatch) as (c, db, prefix):
        key = {"Idempotency-Key": "n-1"}
        first = await c.post("/notes", json={"text": CANARY + "-body"}, headers=key)
        replay = await c.post("/notes", json={"text": CANARY + "-body"}, headers=key)
        miss = await c.get("/notes/a")
        hit = await c.get("/notes/a")
        stored = await _everything_stored(valkey_url, prefix)
    assert first.status_code == 200 and CANARY in first.text
    assert replay.headers["idempotent-replayed"] == "true" and replay.content == first.content
    assert hit.headers["x-cache"] == "hit" and hit.content == miss.content
    assert db["reads"] == 1
    assert stored.count(b"PRS1.k1.") >= 4  # two records, each with sealed headers and body
    assert CANARY.encode() not in stored
    assert b"application/json" not in stored  # headers are sealed too


async def test_records_sealed_with_a_retired_key_still_open_after_rotation(
    policy_dir: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve(policy_dir, valkey_url, monkeypatch) as (c, _, prefix):
        await c.get("/notes/r")
    # Same Valkey data, new process keys: k2 seals from now on, k1 still opens.
    (policy_dir / "routes.yaml").write_text(POLICY)
    monkeypatch.setenv(ENV, f"{K2},{K1}")
    db: dict[str, Any] = {}
    app = make_app(db)
    settings = policyroute.Settings(valkey_url=valkey_url, key_prefix=prefix)
    policyroute.install(app, policy_dir, settings=settings)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with LifespanManager(app), httpx.AsyncClient(
        transport=transport, base_url="http://t"
    ) as c:
        hit = await c.get("/notes/r")
    assert hit.headers["x-cache"] == "hit" and CANARY in hit.text
    assert "reads" not in db


async def test_a_sensitive_route_without_data_keys_refuses_to_start(
    policy_dir: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    (policy_dir / "routes.yaml").write_text(POLICY)
    settings = policyroute.Settings(valkey_url=valkey_url)
    with pytest.raises(ConfigError, match="POLICYROUTE_DATA_KEYS"):
        policyroute.install(make_app({}), policy_dir, settings=settings)


async def test_sealed_fields_reach_the_handler_as_tokens_and_leave_opened(
    policy_dir: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    person = {"name": "ada", "ssn": "123-45-6789", "address": {"street": "1 Main", "zip": 5}}
    async with serve(policy_dir, valkey_url, monkeypatch) as (c, db, _):
        created = await c.post("/people", json=person)
        back = await c.get("/people/ada")
    assert created.status_code == 200
    kept = db["ada"]
    assert kept["name"] == "ada" and kept["address"]["zip"] == 5  # other fields untouched
    assert kept["ssn"].startswith("PRS1.k1.") and "123" not in kept["ssn"]
    assert kept["address"]["street"].startswith("PRS1.k1.")
    keyring = Keyring.parse(K1)
    assert keyring.open(kept["ssn"].encode(), b"ssn") == b'"123-45-6789"'
    assert back.status_code == 200 and back.json() == person
    assert int(back.headers["content-length"]) == len(back.content)


async def test_a_token_moved_to_another_field_or_tampered_does_not_open(
    policy_dir: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve(policy_dir, valkey_url, monkeypatch) as (c, db, _):
        await c.post("/people", json={"name": "bob", "ssn": "999", "address": {"street": "x"}})
        token = db["bob"]["ssn"]
        db["eve"] = {"name": "eve", "ssn": "0", "address": {"street": token}}
        moved = await c.get("/people/eve")
        db["bob"]["ssn"] = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        tampered = await c.get("/people/bob")
        bad_body = await c.post(
            "/people", content=b"not json", headers={"content-type": "application/json"}
        )
    for answer in (moved, tampered):
        assert answer.status_code == 500
        assert answer.json()["type"] == Problems.SEALED_FIELD.uri
        assert "999" not in answer.text and token not in answer.text
    assert bad_body.status_code == 400
    assert bad_body.json()["type"] == Problems.INVALID_BODY.uri


def nested(depth: int) -> bytes:
    """A JSON value nested `depth` arrays deep."""
    return b"[" * depth + b"]" * depth


async def test_json_nested_too_deep_for_the_parser_is_400_and_logs_no_traceback(
    policy_dir: Path,
    valkey_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    json_type = {"content-type": "application/json"}
    async with serve(policy_dir, valkey_url, monkeypatch) as (c, db, _):
        answers = {}
        for depth in (50, 900, 990, 1000, 5000, 100_000):
            body = b'{"name": "n%d", "ssn": %s}' % (depth, nested(depth))
            answers[depth] = await c.post("/people", content=body, headers=json_type)
        body = b'{"name": "x", "ssn": 1, "a": %s}' % nested(3000)
        elsewhere = await c.post("/people", content=body, headers=json_type)
    assert answers[50].status_code == 200
    assert db["n50"]["ssn"].startswith("PRS1.")  # sealed, nesting and all
    for depth, answer in [*answers.items(), (3000, elsewhere)]:
        # Whatever the interpreter's stack allows is sealed; deeper is a bad body, not a 500.
        assert answer.status_code in (200, 400), (depth, answer.status_code)
        if depth >= 1000:
            assert answer.status_code == 400, depth
            assert answer.json()["type"] == Problems.INVALID_BODY.uri
            assert "nested too deeply" in answer.json()["detail"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
