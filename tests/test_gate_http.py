"""The gate over real HTTP (uvicorn with h11 and with httptools), hosts and FastAPI frontends."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fastapi.routing
import pytest
import uvicorn
import websockets.exceptions
from fastapi import APIRouter, FastAPI
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from websockets.sync.client import connect as connect_websocket

import policyroute

from .test_gate import CELLS, NAMES, STANDARD, Cell, call, connect, expected
from .test_gate import ODD as TABLE_ODD

POLICY = """\
version: 1
routes:
  GET /:
    public: true
  GET /api/page:
    public: true
  GET /api/files/{path:path}:
    public: true
  GET /metrics/{path:path}:
    public: true
  POST /metrics/{path:path}:
    public: true
    ip_allowlist: [10.9.9.9/32]
"""


def counting_app(hits: Counter[str], name: str) -> object:
    """A raw ASGI app that answers 200 to every method and counts."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        hits[name] += 1
        await PlainTextResponse(name)(scope, receive, send)

    return app


def build(policy_dir: Path, hits: Counter[str]) -> FastAPI:
    """Mounts at the top and inside an included router, a Starlette route in the router."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/")
    async def home() -> dict[str, str]:
        return {"home": "yes"}

    async def page(request: Request) -> Response:
        hits["page"] += 1
        return PlainTextResponse("page")

    router = APIRouter()
    router.add_route("/page", page, methods=["GET"])
    router.mount("/files", counting_app(hits, "files"))  # type: ignore[arg-type]
    app.include_router(router, prefix="/api")
    app.mount("/metrics", counting_app(hits, "metrics"))  # type: ignore[arg-type]
    app.host("admin.internal", counting_app(hits, "admin"))  # type: ignore[arg-type]
    (policy_dir / "routes.yaml").write_text(POLICY)
    policyroute.install(app, policy_dir)
    return app


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serving(app: FastAPI, http: str, *, proxy_headers: bool = True) -> Iterator[int]:
    """uvicorn serving `app` in a thread with the given HTTP implementation; its port."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=http,
        loop="asyncio",
        lifespan="off",
        proxy_headers=proxy_headers,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def request(port: int, method: str, path: str, host: str = "localhost", extra: str = "") -> int:
    """Send one raw HTTP/1.1 request (the method exactly as given); the status, 0 if refused."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data.startswith(b"HTTP/1.1 "):
        return 0
    return int(data[9:12])


METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
ODD = ("TRACE", "PROPFIND", "QUERY", "SEARCH", "PURGE", "LOCK", "FOO", "get")


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_over_http_no_mount_or_router_route_answers_a_method_no_policy_allows(
    http: str, policy_dir: Path
) -> None:
    hits: Counter[str] = Counter()
    app = build(policy_dir, hits)
    with serving(app, http) as port:
        for method in METHODS + ODD:
            for path, name, host in [
                ("/metrics/x", "metrics", "localhost"),
                ("/api/files/x", "files", "localhost"),
                ("/api/page", "page", "localhost"),
                ("/secret", "admin", "admin.internal"),
            ]:
                before = hits[name]
                status = request(port, method, path, host)
                if name == "files" and not hasattr(fastapi.routing, "_IncludedRouter"):
                    assert status in (0, 400, 404, 405) and hits[name] == before  # dropped
                    continue
                allowed = method in ("GET", "HEAD") and name != "admin"
                if allowed:
                    assert status == 200, (method, path, status)
                else:
                    assert status in (0, 400, 403, 405, 501), (method, path, status)
                assert hits[name] - before == (1 if status == 200 else 0), (method, path)


async def test_a_host_is_governed_by_its_own_policy_not_by_the_root_route(
    policy_dir: Path,
) -> None:
    hits: Counter[str] = Counter()
    app = build(policy_dir, hits)
    status, _ = await call(app, "GET", "/secret", host="admin.internal")
    assert status == 403 and hits["admin"] == 0
    status, _ = await call(app, "GET", "/", host="localhost")
    assert status == 200
    (policy_dir / "routes.yaml").write_text(
        POLICY + "  GET //admin.internal/{path:path}:\n    public: true\n"
    )
    engine = app.state.policyroute
    assert engine.reload() is None
    status, _ = await call(app, "GET", "/secret", host="admin.internal")
    assert status == 200 and hits["admin"] == 1


async def test_a_frontend_is_governed_and_listed(policy_dir: Path, tmp_path: Path) -> None:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    if not hasattr(app, "frontend"):
        pytest.skip("this FastAPI has no frontend()")
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<p>ui</p>")
    app.frontend("/ui", directory=dist)
    (policy_dir / "routes.yaml").write_text("version: 1\nroutes: {}\n")
    with pytest.raises(policyroute.ConfigError, match=r"GET /ui/\{path:path\}"):
        policyroute.install(app, policy_dir, strict=True)
    policyroute.install(app, policy_dir)
    status, _ = await call(app, "GET", "/ui/index.html")
    assert status == 403
    (policy_dir / "routes.yaml").write_text(
        "version: 1\nroutes:\n  GET /ui/{path:path}: {public: true}\n"
    )
    assert app.state.policyroute.reload() is None
    status, sent = await call(app, "GET", "/ui/index.html")
    assert status == 200 and b"ui" in b"".join(m.get("body", b"") for m in sent)


async def test_strict_refuses_a_route_added_after_install_at_startup(policy_dir: Path) -> None:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    (policy_dir / "routes.yaml").write_text("version: 1\nroutes: {}\n")
    policyroute.install(app, policy_dir, strict=True)

    async def late(request: Request) -> Response:
        return PlainTextResponse("late")

    app.router.routes[:] = [Route("/late", late)]
    with pytest.raises(policyroute.ConfigError, match="GET /late"):
        async with app.router.lifespan_context(app):
            pass
    status, _ = await call(app, "GET", "/late")
    assert status == 403


INTERNAL = """\
version: 1
settings:
  trusted_proxies: [TRUSTED]
routes:
  GET /internal:
    public: true
    ip_allowlist: [10.0.0.0/8]
"""


def internal_app(policy_dir: Path, trusted: str) -> FastAPI:
    """A route only the 10/8 network may call."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/internal")
    async def internal() -> dict[str, str]:
        return {"internal": "yes"}

    (policy_dir / "routes.yaml").write_text(INTERNAL.replace("TRUSTED", trusted))
    policyroute.install(app, policy_dir)
    return app


def test_an_address_the_server_rewrote_from_x_forwarded_for_is_refused_not_trusted(
    policy_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The policy trusts no loopback proxy; uvicorn's default (proxy headers on, trusting
    # 127.0.0.1) would let any local caller claim 10.1.2.3.
    app = internal_app(policy_dir, "192.0.2.1/32")
    forged = "X-Forwarded-For: 10.1.2.3\r\n"
    with serving(app, "h11") as port:
        assert request(port, "GET", "/internal", extra=forged) == 403
        assert request(port, "GET", "/internal", extra=forged) == 403
        assert request(port, "GET", "/internal") == 403  # no header: the peer, not allowed
    errors = [r for r in caplog.records if "--no-proxy-headers" in r.getMessage()]
    assert len(errors) <= 1  # once per process (an earlier test may have logged it)
    with serving(app, "h11", proxy_headers=False) as port:
        assert request(port, "GET", "/internal", extra=forged) == 403  # 127.0.0.1 is not 10/8


def test_with_proxy_headers_off_the_policy_decides_whom_to_trust(policy_dir: Path) -> None:
    app = internal_app(policy_dir, "127.0.0.1/32")
    forged = "X-Forwarded-For: 10.1.2.3\r\n"
    with serving(app, "httptools", proxy_headers=False) as port:
        assert request(port, "GET", "/internal", extra=forged) == 200
        assert request(port, "GET", "/internal") == 403


async def test_the_refusal_names_the_cause_and_the_fix(policy_dir: Path) -> None:
    app = internal_app(policy_dir, "192.0.2.1/32")
    headers = [(b"x-forwarded-for", b"10.1.2.3")]
    status, sent = await call(app, "GET", "/internal", headers=headers, client=("10.1.2.3", 0))
    body = b"".join(m["body"] for m in sent if isinstance(m.get("body"), bytes))
    assert status == 403 and b"client-address-rewritten" in body and b"--no-proxy-headers" in body
    status, _ = await call(app, "GET", "/internal", client=("10.1.2.3", 41000))  # a 10/8 peer
    assert status == 200


class Cells:
    """Every cell app of the gate's table behind one server: the `x-cell` header picks one.

    The scope reaches the cell's app unchanged, so each app sees the request exactly as the
    server parsed it (the method as sent, the Host header); each app has its own gate.
    """

    def __init__(self, policies: Path) -> None:
        self.cells: dict[str, Cell] = {}
        self.apps: dict[bytes, FastAPI] = {}
        for n, (kind, depth, mode) in enumerate(CELLS):
            cell = Cell(kind, depth, mode)
            folder = policies / str(n)
            folder.mkdir()
            self.cells[str(n)] = cell
            self.apps[str(n).encode()] = cell.build(folder)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hand the request to the cell app its `x-cell` header names."""
        picked = next(v for k, v in scope["headers"] if k == b"x-cell")
        await self.apps[picked](scope, receive, send)


class Client:
    """Keep-alive HTTP/1.1 requests with the method exactly as given."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def status(self, method: str, path: str, host: str, cell: str) -> int:
        """The response's status; 0 when the server closed without one."""
        try:
            self.conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            self.conn.putheader("Host", host)
            self.conn.putheader("x-cell", cell)
            self.conn.endheaders()
            response = self.conn.getresponse()
            response.read()
            if response.will_close:
                self.conn.close()
            return response.status
        except (http.client.HTTPException, OSError):
            self.conn.close()
            return 0


def _served_at_all(cell: Cell, policies: Path, path: str, host: str) -> bool:
    """Whether plain FastAPI (no policyroute) serves the path (older FastAPI drops some)."""
    plain = Cell(cell.kind, cell.depth, cell.mode).build(policies, install=False)
    return asyncio.run(call(plain, "GET", path, host))[0] != 404


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_the_whole_table_over_http_runs_no_handler_without_its_chain(
    http: str, policy_dir: Path, tmp_path: Path
) -> None:
    """The in-process table of tests/test_gate.py, every cell and method, through uvicorn."""
    cells = Cells(tmp_path)
    with serving(cells, http) as port:  # type: ignore[arg-type]
        client = Client(port)
        try:
            _table(cells, client, port, policy_dir)
        finally:
            client.conn.close()


def _table(cells: Cells, client: Client, port: int, policy_dir: Path) -> None:
    """Every cell, endpoint and method; each websocket cell through a websocket client."""
    for number, cell in cells.cells.items():
        if cell.kind == "websocket":
            _websocket_cell(cell, port, number, policy_dir)
            continue
        for name, method in itertools.product(NAMES, STANDARD + TABLE_ODD):
            path, host = cell.target(name)
            before = cell.hits[name]
            status = client.status(method, path, host, number)
            ran = cell.hits[name] - before
            where = (cell.kind, cell.depth, cell.mode, name, method, status)
            assert ran == (1 if status == 200 else 0), where
            if status == 404 and not _served_at_all(cell, policy_dir, path, host):
                continue
            allowed = expected(cell, name, method)
            if method in TABLE_ODD:
                allowed = allowed | {0, 400, 501}  # the server may refuse it first
            assert status in allowed, where
        assert cell.hits["placeholder"] == 0


def _websocket_cell(cell: Cell, port: int, number: str, policies: Path) -> None:
    for name in NAMES:
        path, _ = cell.target(name)
        before = cell.hits[name]
        try:
            with connect_websocket(
                f"ws://127.0.0.1:{port}{path}", additional_headers={"x-cell": number},
                open_timeout=5,
            ) as socket_:
                accepted = socket_.recv(timeout=5) == name
        except (websockets.exceptions.InvalidStatus, websockets.exceptions.ConnectionClosed):
            accepted = False
        ran = cell.hits[name] - before
        if name == "allow" and not accepted and not _served_at_all_ws(cell, policies, path):
            continue
        assert accepted == (name == "allow"), (cell.kind, cell.depth, cell.mode, name)
        assert ran == (1 if accepted else 0), (cell.kind, cell.depth, cell.mode, name)


def _served_at_all_ws(cell: Cell, policies: Path, path: str) -> bool:
    plain = Cell(cell.kind, cell.depth, cell.mode).build(policies, install=False)
    sent = asyncio.run(connect(plain, path))
    return any(m["type"] == "websocket.accept" for m in sent)
