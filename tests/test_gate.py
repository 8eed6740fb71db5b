"""The gate: no endpoint runs without its chain, whatever the route type, depth, method or
the way the route was added.

One table: route type x nesting depth x how the route was added; each cell sends every
method to three endpoints (policy allows, policy denies, no policy) and checks the handler's
side-effect counter. The templates are written here by hand, not asked of policyroute.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fastapi.routing
import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Host, Mount, Route, Router
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

import policyroute
from policyroute.review.lint import lint

STANDARD = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ODD = ("TRACE", "PROPFIND", "QUERY", "SEARCH", "PURGE", "LOCK", "FOO", "get")
NAMES = ("allow", "deny", "none")
KINDS = ("api", "route", "websocket", "mount", "mount_router", "host")
DEPTHS = (0, 1, 3, 10)
MODES = (
    "before",
    "warm",  # FastAPI built its route caches (url_path_for, a request) before install
    "append",
    "insert",
    "extend",
    "iadd",
    "slice",
    "setitem",
    "replace",
    "helper",  # add_api_route / add_route / mount / host after install
    "include_later",  # the routers are included after install
)


def scope_of(
    kind: str,
    path: str,
    host: str = "testserver",
    headers: Sequence[tuple[bytes, bytes]] = (),
    client: tuple[str, int] = ("127.0.0.1", 50000),
    **extra: Any,
) -> Scope:
    """An HTTP or websocket scope as a server would build it."""
    return {
        "type": kind,
        "asgi": {"version": "3.0"},
        "scheme": "http" if kind == "http" else "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", host.encode()), *headers],
        "client": client,
        "server": ("testserver", 80),
        **extra,
    }


async def call(
    app: Any,
    method: str,
    path: str,
    host: str = "testserver",
    headers: Sequence[tuple[bytes, bytes]] = (),
    client: tuple[str, int] = ("127.0.0.1", 50000),
    body: bytes = b"",
) -> tuple[int, list[Message]]:
    """One HTTP request straight into the ASGI app (any method, any case)."""
    scope = scope_of("http", path, host, headers, client, http_version="1.1", method=method)
    sent: list[Message] = []
    asked = False

    async def receive() -> Message:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    return (starts[0]["status"] if starts else 0), sent


async def connect(app: Any, path: str, host: str = "testserver") -> list[Message]:
    """Open a websocket straight into the ASGI app; what the app sent back."""
    scope = scope_of("websocket", path, host, subprotocols=[])
    inbox = [{"type": "websocket.connect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        if inbox:
            return inbox.pop(0)
        await asyncio.sleep(0.05)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


class Cell:
    """One app of the table: three endpoints of one kind at one depth, added one way."""

    def __init__(self, kind: str, depth: int, mode: str) -> None:
        self.kind, self.depth, self.mode = kind, depth, mode
        self.hits: Counter[str] = Counter()
        self.prefix = "".join(f"/d{i}" for i in range(1, depth + 1))

    # -- endpoints that count ---------------------------------------------------------------

    def _http(self, name: str) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            self.hits[name] += 1
            return PlainTextResponse(name)

        return endpoint

    def _api(self, name: str) -> Callable[..., Any]:
        async def endpoint() -> dict[str, str]:
            self.hits[name] += 1
            return {"name": name}

        return endpoint

    def _socket(self, name: str) -> Callable[..., Any]:
        async def endpoint(websocket: WebSocket) -> None:
            self.hits[name] += 1
            await websocket.accept()
            await websocket.send_text(name)
            await websocket.close()

        return endpoint

    def _asgi(self, name: str) -> Any:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            self.hits[name] += 1
            await PlainTextResponse(name)(scope, receive, send)

        return app

    def route(self, name: str) -> BaseRoute:
        """The route object of endpoint `name`."""
        if self.kind == "api":
            return APIRoute(f"/{name}", self._api(name), methods=["GET"])
        if self.kind == "route":
            return Route(f"/{name}", self._http(name), methods=["GET"])
        if self.kind == "websocket":
            return APIWebSocketRoute(f"/{name}", self._socket(name))
        if self.kind == "mount":
            return Mount(f"/{name}", app=self._asgi(name))
        if self.kind == "mount_router":
            return Mount(f"/{name}", routes=[Route("/leaf", self._http(name), methods=["GET"])])
        return Host(f"{name}.internal", app=self._asgi(name))

    def helper(self, router: APIRouter, name: str) -> None:
        """Add endpoint `name` with the router's own method."""
        if self.kind == "api":
            router.add_api_route(f"/{name}", self._api(name), methods=["GET"])
        elif self.kind == "route":
            router.add_route(f"/{name}", self._http(name), methods=["GET"])
        elif self.kind == "websocket":
            router.add_api_websocket_route(f"/{name}", self._socket(name))
        elif self.kind == "mount":
            router.mount(f"/{name}", self._asgi(name))
        elif self.kind == "mount_router":
            router.mount(
                f"/{name}", Router(routes=[Route("/leaf", self._http(name), methods=["GET"])])
            )
        else:
            router.host(f"{name}.internal", self._asgi(name))

    def template(self, name: str) -> str:
        """The policy template of endpoint `name`, written out by hand."""
        if self.kind == "mount":
            return f"{self.prefix}/{name}/{{path:path}}"
        if self.kind == "mount_router":
            return f"{self.prefix}/{name}/leaf"
        if self.kind == "host":
            return f"//{name}.internal{self.prefix}/{{path:path}}"
        return f"{self.prefix}/{name}"

    def target(self, name: str) -> tuple[str, str]:
        """(path, host) a request to endpoint `name` uses."""
        if self.kind == "mount":
            return f"{self.prefix}/{name}/x", "testserver"
        if self.kind == "mount_router":
            return f"{self.prefix}/{name}/leaf", "testserver"
        if self.kind == "host":
            return f"{self.prefix}/x", f"{name}.internal"
        return f"{self.prefix}/{name}", "testserver"

    def policy(self) -> str:
        """allow is public, deny admits an address no test uses, none has no policy."""
        return (
            "version: 1\nroutes:\n"
            f"  GET {self.template('allow')}: {{public: true}}\n"
            f"  GET {self.template('deny')}: {{public: true, ip_allowlist: [10.9.9.9/32]}}\n"
        )

    # -- building the app ------------------------------------------------------------------

    def build(self, policies: Path, install: bool = True) -> FastAPI:
        """The app, its routes added the cell's way around `install`."""
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        routers = [APIRouter() for _ in range(self.depth)]
        leaf: APIRouter = routers[-1] if routers else app.router
        placeholder = Route("/placeholder", self._http("placeholder"), methods=["GET"])
        leaf.routes.append(placeholder)
        if self.mode == "before" or self.mode == "warm":
            for name in NAMES:
                leaf.routes.append(self.route(name))

        def include() -> None:
            for i in range(self.depth - 1, 0, -1):
                routers[i - 1].include_router(routers[i], prefix=f"/d{i + 1}")
            if routers:
                app.include_router(routers[0], prefix="/d1")

        if self.mode != "include_later":
            include()
        if self.mode == "warm":
            # FastAPI builds its included-route objects on the first lookup.
            assert str(app.url_path_for("endpoint")).endswith("/placeholder")
        (policies / "routes.yaml").write_text(self.policy())
        if install:
            policyroute.install(app, policies)
        new = [self.route(n) for n in NAMES]
        if self.mode == "append":
            for r in new:
                leaf.routes.append(r)
        elif self.mode == "insert":
            for r in new:
                leaf.routes.insert(0, r)
        elif self.mode == "extend":
            leaf.routes.extend(new)
        elif self.mode == "iadd":
            routes = leaf.routes
            routes += new
            leaf.routes = routes
        elif self.mode == "slice":
            leaf.routes[len(leaf.routes) :] = new
        elif self.mode == "setitem":
            leaf.routes[leaf.routes.index(placeholder)] = new[0]
            leaf.routes.extend(new[1:])
        elif self.mode == "replace":
            leaf.routes = [*leaf.routes, *new]
        elif self.mode == "helper":
            for name in NAMES:
                self.helper(leaf, name)
        elif self.mode == "include_later":
            for name in NAMES:
                leaf.routes.append(self.route(name))
            include()
        if self.depth and hasattr(leaf, "_mark_routes_changed"):
            leaf._mark_routes_changed()  # what FastAPI's own helpers do after a change
        return app


CELLS = [
    (k, d, m)
    for k, d, m in itertools.product(KINDS, DEPTHS, MODES)
    if not (d == 0 and m == "include_later")
    # Starlette's Host is reached by header; FastAPI includes it under a prefix from 0.120.
]


def expected(cell: Cell, name: str, method: str) -> set[int]:
    """The statuses a request may get: the handler runs only on an allowed GET or HEAD."""
    if method not in STANDARD:
        return {405}
    any_method = cell.kind in ("mount", "host")
    # FastAPI's APIRoute declares GET alone; Starlette's Route adds HEAD to GET.
    declared = ("GET",) if cell.kind == "api" else ("GET", "HEAD")
    if any_method and method not in declared:
        return {403}
    if method not in declared:
        return {405}
    return {200} if name == "allow" else {403}


@pytest.mark.parametrize(("kind", "depth", "mode"), CELLS)
async def test_no_handler_runs_without_its_chain(
    kind: str, depth: int, mode: str, policy_dir: Path
) -> None:
    cell = Cell(kind, depth, mode)
    app = cell.build(policy_dir)
    if kind == "websocket":
        served = 1
        for name in NAMES:
            path, host = cell.target(name)
            sent = await connect(app, path, host)
            accepted = any(m["type"] == "websocket.accept" for m in sent)
            if not accepted and name == "allow":  # served by this FastAPI at all?
                plain = Cell(kind, depth, mode).build(policy_dir, install=False)
                assert not any(m["type"] == "websocket.accept" for m in await connect(plain, path))
                served = 0
                continue
            assert accepted == (name == "allow"), (name, sent)
            assert cell.hits[name] == (1 if name == "allow" else 0)
        for method in ("GET", "POST", "FOO", "get"):  # HTTP to a websocket route
            status, _ = await call(app, method, cell.target("allow")[0])
            assert status in (404, 405), (method, status)
        assert cell.hits["allow"] == served
        return
    for name, method in itertools.product(NAMES, STANDARD + ODD):
        before = cell.hits[name]
        path, host = cell.target(name)
        status, _ = await call(app, method, path, host)
        ran = cell.hits[name] - before
        if status == 404 and not ran:
            # Older FastAPI copies routes at include time and drops mounts and hosts of an
            # included router: then plain FastAPI does not serve the route either.
            control = Cell(kind, depth, mode)
            plain = control.build(policy_dir, install=False)
            assert (await call(plain, "GET", path, host))[0] == 404, (name, method)
            continue
        assert status in expected(cell, name, method), (name, method, status)
        assert ran == (1 if status == 200 else 0), (name, method, status, ran)
    assert cell.hits["placeholder"] == 0


@pytest.mark.parametrize("depth", [0, 1, 4])
async def test_lint_lists_exactly_the_endpoints_the_gate_governs(
    depth: int, policy_dir: Path
) -> None:
    """Every endpoint kind at once: lint's no-policy list names each endpoint's template."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    (policy_dir / "routes.yaml").write_text("version: 1\nroutes: {}\n")
    names = []
    for kind in KINDS:
        cell = Cell(kind, depth, "before")
        routers = [APIRouter() for _ in range(depth)]
        leaf: APIRouter = routers[-1] if routers else app.router
        leaf.routes.append(cell.route("allow"))
        for i in range(depth - 1, 0, -1):
            routers[i - 1].include_router(routers[i], prefix=f"/d{i + 1}")
        if routers:
            app.include_router(routers[0], prefix="/d1")
        names.append(cell.template("allow"))
    found = {f.message.split(" ")[3] for f in lint([policy_dir], app)}
    if depth and not hasattr(fastapi.routing, "_IncludedRouter"):
        # Older FastAPI drops the mounts and hosts of an included router: nothing to serve.
        names = [n for n in names if "{path:path}" not in n and "/leaf" not in n]
    assert found == set(names)


@pytest.mark.parametrize("where", ["app", "included"])
async def test_a_partial_match_inside_a_mount_is_final_as_the_router_makes_it(
    where: str, policy_dir: Path
) -> None:
    """The router commits to a mount: a method its inner route lacks is 405, never a later
    route of the outer router (which the router would not reach)."""
    if where == "included" and not hasattr(fastapi.routing, "_IncludedRouter"):
        pytest.skip("this FastAPI drops the mounts of an included router")
    hits: Counter[str] = Counter()

    async def inner(request: Request) -> Response:
        hits["inner"] += 1
        return PlainTextResponse("inner")

    def build(install: bool) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        mount = Mount("/a", routes=[Route("/x", inner, methods=["POST"])])
        if where == "app":
            app.router.routes.append(mount)
        else:
            router = APIRouter()
            router.routes.append(mount)
            app.include_router(router, prefix="/p")

        @app.get("/a/x" if where == "app" else "/p/a/x")
        async def later() -> dict[str, str]:
            hits["later"] += 1
            return {"later": "yes"}

        if install:
            prefix = "" if where == "app" else "/p"
            (policy_dir / "routes.yaml").write_text(
                "version: 1\nroutes:\n"
                f"  GET {prefix}/a/x: {{public: true}}\n  POST {prefix}/a/x: {{public: true}}\n"
            )
            policyroute.install(app, policy_dir)
        return app

    path = "/a/x" if where == "app" else "/p/a/x"
    assert (await call(build(install=False), "GET", path))[0] == 405  # what the router does
    hits.clear()
    app = build(install=True)
    status, _ = await call(app, "GET", path)
    assert status == 405 and hits["later"] == 0 and hits["inner"] == 0
    status, _ = await call(app, "POST", path)
    assert status == 200 and hits["inner"] == 1


class _Counted(Route):
    """A route that counts how often it is asked whether it matches."""

    asked = 0

    def matches(self, scope: Scope) -> tuple[Any, Scope]:
        _Counted.asked += 1
        return super().matches(scope)


@pytest.mark.parametrize("inner_router", ["starlette", "fastapi"])
async def test_inside_plain_mounts_and_hosts_the_endpoint_sees_the_routers_scope_once_matched(
    inner_router: str, policy_dir: Path
) -> None:
    """Through mounts of routers and a host, the gate makes each router's selection itself:
    the endpoint sees the scope the routers would make (root path, path parameters, route,
    router) and no route inside is asked to match twice."""
    seen: list[dict[str, Any]] = []

    async def leaf(request: Request) -> Response:
        scope = request.scope
        seen.append({
            "root_path": scope["root_path"],
            "path": scope["path"],
            "path_params": dict(scope["path_params"]),
            "top_router": scope["router"] is app_router[0],
        })
        routes.append(getattr(scope.get("route"), "path", None))
        return PlainTextResponse("ok")

    app_router: list[Any] = []
    routes: list[str | None] = []  # the selected route, where this Starlette records it

    def build(install: bool) -> FastAPI:
        inner = APIRouter() if inner_router == "fastapi" else Router()
        inner.routes.append(_Counted("/leaf/{item}", leaf, methods=["GET"]))
        middle = Router(routes=[Mount("/m2/{b}", app=inner)])
        hosted = Router(routes=[Mount("/h", app=Router(routes=[_Counted("/x", leaf)]))])
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.router.routes.append(Mount("/m1/{a}", app=middle))
        app.router.routes.append(Host("api.test", app=hosted))
        app_router[:] = [app.router]
        if install:
            (policy_dir / "routes.yaml").write_text(
                "version: 1\nroutes:\n"
                "  GET /m1/{a}/m2/{b}/leaf/{item}: {public: true}\n"
                "  GET //api.test/h/x: {public: true}\n"
            )
            policyroute.install(app, policy_dir)
        return app

    requests = [("/m1/one/m2/two/leaf/3", "testserver"), ("/h/x", "api.test")]
    for install in (False, True):
        app = build(install)
        _Counted.asked = 0
        for path, host in requests:
            assert (await call(app, "GET", path, host))[0] == 200
        assert _Counted.asked == 2  # one question to each leaf route, by whoever routes
    assert seen[:2] == seen[2:]  # the same scope with the gate as without it
    assert routes[:2] in (routes[2:], [None, None])  # older Starlette sets no route
    assert seen[0]["path_params"] == {"a": "one", "b": "two", "item": "3"}


class _CountedAPI(APIRoute):
    """An API route that counts how often it is asked whether it matches."""

    asked = 0

    def matches(self, scope: Scope) -> tuple[Any, Scope]:
        _CountedAPI.asked += 1
        return super().matches(scope)


async def test_through_included_routers_the_endpoint_sees_fastapis_scope_matched_once(
    policy_dir: Path,
) -> None:
    """Behind routers included three deep, the gate makes each inclusion's selection itself:
    the endpoint sees the scope FastAPI's own dispatch makes (route, path parameters, the
    inclusion's dependencies run once, its body limit kept for a plain route), and the route
    is asked to match once per request, where FastAPI alone asks again at every level."""
    seen: list[dict[str, Any]] = []
    dependency_runs: list[str] = []

    async def mark() -> None:
        dependency_runs.append("dep")

    async def api_leaf(item: int, request: Request) -> dict[str, int]:
        scope = request.scope
        context = scope.get("fastapi", {}).get("effective_route_context")
        seen.append({
            "path_params": dict(scope["path_params"]),
            "route": getattr(scope.get("route"), "path", None),
            "context_route": getattr(getattr(context, "original_route", None), "path", None),
            "url": str(request.url_for("api_leaf", item=item)),
        })
        return {"item": item}

    async def plain_leaf(request: Request) -> Response:
        body = await request.body()
        return PlainTextResponse(f"plain {request.path_params['x']} {len(body)}")

    def build(install: bool) -> FastAPI:
        routers = [APIRouter() for _ in range(3)]
        routers[2].routes.append(
            _CountedAPI("/leaf/{item}", api_leaf, methods=["GET"], name="api_leaf")
        )
        routers[2].add_route("/plain/{x}", plain_leaf, methods=["POST"])
        routers[1].include_router(routers[2], prefix="/c", dependencies=[Depends(mark)])
        routers[0].include_router(routers[1], prefix="/b")
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        limit: dict[str, Any] = {"max_body_size": 16} if _INCLUDE_HAS_BODY_LIMIT else {}
        app.include_router(routers[0], prefix="/a", **limit)
        if install:
            (policy_dir / "routes.yaml").write_text(
                "version: 1\nroutes:\n"
                "  GET /a/b/c/leaf/{item}: {public: true}\n"
                "  POST /a/b/c/plain/{x}: {public: true}\n"
            )
            policyroute.install(app, policy_dir)
        return app

    results: list[list[tuple[int, bytes]]] = []
    for install in (False, True):
        app = build(install)
        _CountedAPI.asked = 0
        answers = [await call(app, "GET", f"/a/b/c/leaf/{i}") for i in range(3)]
        if install:
            assert _CountedAPI.asked == 3  # once per request: nothing matched twice
        answers.append(await call(app, "POST", "/a/b/c/plain/7", body=b"x" * 4))
        answers.append(await call(app, "POST", "/a/b/c/plain/7", body=b"x" * 64))
        results.append([(status, _body(sent)) for status, sent in answers])
    assert results[0] == results[1]  # the same answers with the gate as without it
    assert [status for status, _ in results[1][:4]] == [200, 200, 200, 200]
    assert results[1][3][1] == b"plain 7 4"
    if _INCLUDE_HAS_BODY_LIMIT:
        assert results[1][4][0] == 413  # the inclusion's body limit still holds
    assert seen[:3] == seen[3:]  # the same scope with the gate as without it
    assert seen[0]["path_params"] == {"item": "0"}
    assert dependency_runs == ["dep"] * 6  # once per request, with or without the gate


def _body(sent: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


_INCLUDE_HAS_BODY_LIMIT = "max_body_size" in inspect.signature(
    APIRouter.include_router
).parameters


@pytest.mark.skipif(not _INCLUDE_HAS_BODY_LIMIT, reason="this FastAPI has no include body limit")
async def test_a_mount_inside_an_inclusion_keeps_the_inclusions_body_limit(
    policy_dir: Path,
) -> None:
    """A router mounted inside an included router is reached through the inclusion's own
    handle, so the inclusion's body limit holds with the gate as it does without it."""

    async def upload(request: Request) -> Response:
        return PlainTextResponse(str(len(await request.body())))

    def build(install: bool) -> FastAPI:
        inner = APIRouter()
        inner.mount("/files", Router(routes=[Route("/up", upload, methods=["POST"])]))
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.include_router(inner, prefix="/p", max_body_size=16)
        if install:
            (policy_dir / "routes.yaml").write_text(
                "version: 1\nroutes:\n  POST /p/files/up: {public: true}\n"
            )
            policyroute.install(app, policy_dir)
        return app

    for install in (False, True):
        app = build(install)
        small = await call(app, "POST", "/p/files/up", body=b"x" * 4)
        big = await call(app, "POST", "/p/files/up", body=b"x" * 64)
        assert (small[0], _body(small[1])) == (200, b"4")
        assert big[0] == 413, f"install={install}"
