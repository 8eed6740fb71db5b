"""Remembered route resolutions: the same route, the same chain, as Starlette's matching.

The gate remembers which top-level route a request's type, method, path and root path
matched (`gate.RouteMemo`). These hold it to what matching every time gives: after the
route list changes in any way before the remembered route, for path parameters a handler
changes, for routes whose match depends on more than the path, and at the memo's bound.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import policyroute
from policyroute.asgi import gate
from policyroute.asgi.gate import RouteMemo, RouterGate
from tests.test_gate import call, connect

POLICY = """version: 1
routes:
  GET /a: {public: true}
  GET /items/{item}: {public: true}
  GET /n/{number:int}: {public: true}
  GET /shout/{word:upper}: {public: true}
  GET /say/{word}: {public: true}
  GET /b: {public: true, ip_allowlist: [10.9.9.9/32]}
  POST /a: {public: true}
"""


class Upper(Convertor[str]):
    """A convertor of the app's own: its answer is not Starlette's to vouch for."""

    regex = "[A-Z]+"

    def convert(self, value: str) -> str:
        return value.lower()

    def to_string(self, value: str) -> str:
        return value.upper()


register_url_convertor("upper", Upper())


def _echo(name: str) -> Any:
    async def endpoint(request: Request) -> Response:
        params = request.scope["path_params"]
        shown = ",".join(f"{k}={v!r}" for k, v in sorted(params.items()))
        params["item"] = "changed by the handler"  # a handler may change its scope
        return PlainTextResponse(f"{name} {shown}")

    return endpoint


def _app(policy_dir: Path, install: bool = True) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    for path, name in (("/a", "a"), ("/items/{item}", "items"), ("/n/{number:int}", "n"),
                       ("/shout/{word:upper}", "upper"), ("/say/{word}", "word")):  # fmt: skip
        app.router.routes.append(APIRoute(path, _echo(name), methods=["GET", "POST"]))
    app.router.routes.append(Route("/b", _echo("b"), methods=["GET"]))
    (policy_dir / "routes.yaml").write_text(POLICY)
    if install:
        policyroute.install(app, policy_dir)
    return app


def _memo(app: Any) -> RouteMemo:
    stack = app.router.middleware_stack
    assert isinstance(stack, RouterGate) and stack.memo is not None
    return stack.memo


async def _answer(app: Any, method: str, path: str, **scope: Any) -> tuple[int, bytes]:
    status, sent = await call(app, method, path, **scope)
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def test_remembered_requests_answer_as_matching_every_time(policy_dir: Path) -> None:
    app, matching = _app(policy_dir), _app(policy_dir)
    gate_of = matching.router.middleware_stack
    assert isinstance(gate_of, RouterGate)
    gate_of.memo = None  # this one matches every request
    paths = ["/a", "/b", "/items/1", "/items/x y", "/n/7", "/n/x", "/shout/HEY", "/shout/hey",
             "/say/hi", "/nowhere", "/a/"]  # fmt: skip
    for _ in range(3):  # the first round fills the memo, the later ones are answered from it
        for method, path in itertools.product(("GET", "POST", "HEAD", "DELETE", "get"), paths):
            got = await _answer(app, method, path)
            assert got == await _answer(matching, method, path), (method, path)
    remembered = {key[1:3] for key in _memo(app).entries}
    assert ("GET", "/items/1") in remembered and ("POST", "/n/7") in remembered
    # A route whose convertor is the app's own, and the routes behind it, are matched every
    # time; so are requests no route matches fully.
    assert not any(path.startswith(("/shout", "/say", "/b")) for _, path in remembered)
    assert ("DELETE", "/a") not in remembered and ("GET", "/nowhere") not in remembered


async def test_a_route_put_before_a_remembered_one_takes_its_requests_at_once(
    policy_dir: Path,
) -> None:
    app = _app(policy_dir)
    routes = app.router.routes
    assert await _answer(app, "GET", "/a") == (200, b"a ")
    assert await _answer(app, "GET", "/a") == (200, b"a ")  # from the memo
    # Inserted first: its own chain (/b's policy refuses) and handler, not /a's.
    routes.insert(0, APIRoute("/a", _echo("first"), methods=["GET"]))
    assert (await _answer(app, "GET", "/a"))[1] == b"first "
    # Replaced in place, removed, the list replaced whole: each seen on the next request.
    routes[0] = APIRoute("/a", _echo("second"), methods=["GET"])
    assert (await _answer(app, "GET", "/a"))[1] == b"second "
    del routes[0]
    assert (await _answer(app, "GET", "/a"))[1] == b"a "
    app.router.routes = [APIRoute("/a", _echo("whole"), methods=["GET"])]
    assert (await _answer(app, "GET", "/a"))[1] == b"whole "
    app.router.routes = []
    assert (await _answer(app, "GET", "/a"))[0] == 404


async def test_a_route_put_before_a_remembered_one_runs_its_own_chain(policy_dir: Path) -> None:
    app = _app(policy_dir)
    assert await _answer(app, "GET", "/a") == (200, b"a ")
    assert await _answer(app, "GET", "/a") == (200, b"a ")
    # A route of another template answering /a: the chain of GET /b (refuses) must run.
    app.router.routes.insert(0, Route("/{x:path}", _echo("catch-all"), methods=["GET"]))
    status, body = await _answer(app, "GET", "/a")
    assert status == 403 and b"catch-all" not in body


async def test_a_handler_that_changes_its_path_parameters_changes_nothing_remembered(
    policy_dir: Path,
) -> None:
    app = _app(policy_dir)
    for _ in range(3):
        assert await _answer(app, "GET", "/items/42") == (200, b"items item='42'")
        assert await _answer(app, "GET", "/n/7") == (200, b"n number=7")


async def test_the_root_path_is_part_of_what_is_remembered(policy_dir: Path) -> None:
    app, plain = _app(policy_dir), _app(policy_dir, install=False)
    for root in ("", "/api", "/api", "", "/items"):
        scope = {"path": root + "/items/9"}
        got = await _answer_with(app, scope, root)
        assert got == await _answer_with(plain, scope, root), root


async def _answer_with(app: Any, scope: dict[str, Any], root: str) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(
        {"type": "http", "method": "GET", "path": scope["path"], "root_path": root,
         "raw_path": scope["path"].encode(), "query_string": b"", "headers": [],
         "client": ("127.0.0.1", 1), "server": ("t", 80), "http_version": "1.1"},
        receive, send,
    )  # fmt: skip
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def test_the_memo_keeps_within_its_bound(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gate, "MEMO_ROUTES", 5)
    app = _app(policy_dir)
    for i in range(40):
        assert await _answer(app, "GET", f"/items/{i}") == (200, f"items item='{i}'".encode())
        assert len(_memo(app).entries) <= 5
    long = "/items/" + "x" * 600  # past MEMO_PATH: matched, answered, not remembered
    assert (await _answer(app, "GET", long))[0] == 200
    assert not any(len(key[2]) > 512 for key in _memo(app).entries)


def _socket(name: str) -> Any:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(name)
        await websocket.close()

    return endpoint


async def test_websocket_and_starlette_routes_are_remembered_the_same_way(
    policy_dir: Path,
) -> None:
    (policy_dir / "routes.yaml").write_text(
        "version: 1\nroutes:\n  GET /ws: {public: true}\n  GET /s: {public: true}\n"
    )
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.router.routes.append(APIWebSocketRoute("/ws", _socket("first")))
    policyroute.install(app, policy_dir)
    texts = [[m.get("text") for m in await connect(app, "/ws")] for _ in range(2)]
    assert texts == [[None, "first", None]] * 2
    assert any(key[0] == "websocket" for key in _memo(app).entries)
    # A websocket route of another template put first: its own policy decides (it has none:
    # refused), not the remembered route's.
    app.router.routes.insert(0, WebSocketRoute("/{x}", _socket("catch-all")))
    sent = await connect(app, "/ws")
    assert [m["type"] for m in sent] == ["websocket.close"] and sent[0]["code"] == 1008

    # A Starlette route on the same app: remembered, and a route put before it seen.
    app.router.routes.append(Route("/s", _echo("s"), methods=["GET"]))
    for _ in range(2):
        assert await _answer(app, "GET", "/s") == (200, b"s ")
    assert ("http", "GET", "/s", "") in _memo(app).entries  # a websocket route before it
    del app.router.routes[0]
    for _ in range(2):
        assert await _answer(app, "GET", "/s") == (200, b"s ")
    app.router.routes.insert(0, Route("/s", _echo("t"), methods=["GET"]))
    assert await _answer(app, "GET", "/s") == (200, b"t ")
