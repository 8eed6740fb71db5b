"""max_header_bytes: a larger header value is answered 431 before any step reads it."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

from fastapi import FastAPI, WebSocket
from starlette.types import Message

import policyroute
from policyroute.admin import credits
from policyroute.errors import Problems
from tests.test_gate import scope_of

from .stateful import engine, make_app, running

LIMIT = 2048

POLICY = """\
version: 1
routes:
  GET /charge:
    public: true
    rate_limit: {key: "header:x-tenant", capacity: 2, refill: 1, per: 60s, name: tenant}
    credits: {cost: 1}
"""


def installed(policy_dir: Path, valkey_url: str, calls: Counter[str]) -> FastAPI:
    """The stateful test app with a header limit of `LIMIT` bytes."""
    (policy_dir / "routes.yaml").write_text(POLICY)
    app = make_app(calls)
    settings = policyroute.Settings(
        valkey_url=valkey_url, key_prefix="t" + uuid.uuid4().hex[:10], max_header_bytes=LIMIT
    )
    policyroute.install(app, policy_dir, settings=settings)
    return app


async def test_a_header_over_the_limit_is_refused_before_any_step(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = installed(policy_dir, valkey_url, calls)
    tenant = {"x-tenant": "acme"}
    async with running(app) as c:
        store = engine(app).services["valkey"]
        await credits.grant(store, "127.0.0.1", 5, ip=True)
        refused = [
            # the header a rate limit is keyed by
            await c.get("/charge", headers={"x-tenant": "a" * (LIMIT + 1)}),
            # any other header, on a request that would otherwise be served
            await c.get("/charge", headers={**tenant, "x-note": "n" * (LIMIT + 1)}),
            # one field on many lines: steps read it joined, so the joined value counts
            await c.get(
                "/charge", headers=[("x-tenant", "acme")] + [("x-forwarded-for", "1" * 200)] * 11
            ),
            # a route no policy names: 431 before the deny step
            await c.get("/other", headers={"x-note": "n" * (LIMIT + 1)}),
            # an oversized request id is neither read nor echoed
            await c.get("/charge", headers={**tenant, "x-request-id": "r" * (LIMIT + 1)}),
        ]
        at_limit = await c.get("/charge", headers={**tenant, "x-note": "n" * LIMIT})
        balance = await credits.show(store, "127.0.0.1", ip=True)

    for answer in refused:
        assert answer.status_code == 431
        assert answer.headers["content-type"] == "application/problem+json"
        body = answer.json()
        assert body["type"] == Problems.HEADER_TOO_LARGE.uri
        assert body["limit"] == LIMIT
        assert len(answer.headers["x-request-id"]) < 100
        assert "ratelimit" not in answer.headers
    details = [r.json()["detail"] for r in refused]
    assert details[0] == (
        f"the x-tenant header is {LIMIT + 1} bytes; this server reads header values of at "
        f"most {LIMIT} bytes"
    )
    assert details[1].startswith("the x-note header is")
    assert details[2].startswith(f"the x-forwarded-for header is {11 * 200 + 10 * 2} bytes")
    assert details[4].startswith("the x-request-id header is")

    # Nothing was taken: the first request served sees a full bucket and the credits it had.
    assert at_limit.status_code == 200
    assert at_limit.headers["ratelimit"] == '"tenant";r=1;t=60'
    assert balance.total == 4
    assert calls["charge"] == 1 and calls["other"] == 0


async def test_a_websocket_with_a_header_over_the_limit_is_closed(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text("version: 1\nroutes:\n  GET /ws:\n    public: true\n")
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    policyroute.install(app, policy_dir, settings=policyroute.Settings(max_header_bytes=LIMIT))

    async def opened(headers: list[tuple[bytes, bytes]]) -> list[Message]:
        inbox: list[Message] = [{"type": "websocket.connect"}]
        sent: list[Message] = []

        async def receive() -> Message:
            return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = scope_of("websocket", "/ws", headers=headers, subprotocols=[])
        await app(scope, receive, send)
        return sent

    refused = await opened([(b"x-note", b"n" * (LIMIT + 1))])
    served = await opened([(b"x-note", b"n" * LIMIT)])
    assert refused == [{"type": "websocket.close", "code": 1008, "reason": "header-too-large"}]
    assert [m["type"] for m in served][:2] == ["websocket.accept", "websocket.send"]
