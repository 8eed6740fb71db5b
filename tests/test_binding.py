"""Binding chains to an app's routes: deny by default, no way around a policy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.websockets import WebSocket

import policyroute
from policyroute import ConfigError
from policyroute.compile import compiler
from tests.test_gate import scope_of

POLICY = """\
version: 1
routes:
  GET /open:
    public: true
  GET /items/{item_id}:
    public: true
  GET /static/{path:path}:
    public: true
"""


def make_app() -> FastAPI:
    """An app with governed and ungoverned routes of every kind."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/open")
    async def open_route(
        who: policyroute.Principal = Depends(policyroute.principal),
    ) -> dict[str, object]:
        return {"ok": True, "authenticated": who.authenticated}

    @app.post("/open")
    async def open_post() -> dict[str, bool]:
        return {"posted": True}

    @app.get("/items/{item_id:int}")
    async def items(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.get("/secret")
    async def secret() -> dict[str, str]:
        return {"secret": "leaked"}

    async def page(request: object) -> PlainTextResponse:
        return PlainTextResponse("page")

    app.router.routes.append(Route("/page", page, methods=["GET"]))
    app.mount("/static", Mount("", routes=[Route("/{path:path}", page)]))

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    return app


@pytest.fixture
def policies(policy_dir: Path) -> Path:
    """The policy directory with the test policy."""
    (policy_dir / "routes.yaml").write_text(POLICY)
    return policy_dir


@pytest.fixture
async def client(policies: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the gated test app."""
    app = make_app()
    policyroute.install(app, policies)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


def assert_denied(response: httpx.Response) -> None:
    """403 problem+json with the no-policy type."""
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "urn:policyroute:problem:no-policy"
    assert body["status"] == 403
    assert "leaked" not in response.text


async def test_public_route_answers(client: httpx.AsyncClient) -> None:
    response = await client.get("/open")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "authenticated": False}


async def test_route_without_policy_is_denied_with_problem_json(client: httpx.AsyncClient) -> None:
    assert_denied(await client.get("/secret"))


async def test_other_method_on_a_governed_path_is_denied(client: httpx.AsyncClient) -> None:
    assert_denied(await client.post("/open"))


async def test_percent_encoding_cannot_slip_past(client: httpx.AsyncClient) -> None:
    assert_denied(await client.get("/s%65cret"))
    assert (await client.get("/it%65ms/5")).json() == {"id": 5}


async def test_case_change_does_not_reach_the_handler(client: httpx.AsyncClient) -> None:
    response = await client.get("/SECRET")
    assert response.status_code == 404
    assert "leaked" not in response.text


async def test_trailing_slash_redirects_to_the_gated_route(client: httpx.AsyncClient) -> None:
    response = await client.get("/secret/", follow_redirects=False)
    assert response.status_code == 307
    assert_denied(await client.get("/secret/", follow_redirects=True))


async def test_options_never_reaches_a_handler(client: httpx.AsyncClient) -> None:
    response = await client.options("/secret")
    assert response.status_code in (403, 405)
    assert "leaked" not in response.text


async def test_head_follows_the_get_policy(client: httpx.AsyncClient) -> None:
    assert (await client.head("/page")).status_code == 403
    assert (await client.head("/static/x")).status_code == 200


async def test_plain_starlette_route_is_gated(client: httpx.AsyncClient) -> None:
    assert_denied(await client.get("/page"))


async def test_mount_is_governed_by_its_path_template(client: httpx.AsyncClient) -> None:
    assert (await client.get("/static/a/b.css")).text == "page"


async def test_route_added_after_install_is_denied(policies: Path) -> None:
    app = make_app()
    policyroute.install(app, policies)

    @app.get("/late")
    async def late() -> dict[str, str]:
        return {"secret": "leaked"}

    router = APIRouter(prefix="/sub")

    @router.get("/inner")
    async def inner() -> dict[str, str]:
        return {"secret": "leaked"}

    app.include_router(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert_denied(await c.get("/late"))
        assert_denied(await c.get("/sub/inner"))


def test_strict_install_refuses_an_ungoverned_route(policies: Path) -> None:
    with pytest.raises(ConfigError, match=r"GET /secret has no policy"):
        policyroute.install(make_app(), policies, strict=True)


def test_install_names_what_it_governs_when_given_another_app(policies: Path) -> None:
    with pytest.raises(TypeError, match="governs a FastAPI app; got a Starlette"):
        policyroute.install(Starlette(), policies)  # type: ignore[arg-type]


def test_install_refuses_keys_it_cannot_enforce(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (policy_dir / "a.yaml").write_text(
        "version: 1\nroutes:\n  GET /open:\n    public: true\n    breaker: {failures: 3}\n"
    )
    # A build whose steps do not cover `breaker` (as an older version's would not).
    makers = [(keys, make) for keys, make in compiler.MAKERS if "breaker" not in keys]
    monkeypatch.setattr(compiler, "MAKERS", makers)
    with pytest.raises(ConfigError, match="not-enforced"):
        policyroute.install(make_app(), policy_dir)


async def test_reload_swaps_every_route_at_once_and_keeps_good_policy_on_error(
    policies: Path,
) -> None:
    app = make_app()
    engine = policyroute.install(app, policies)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/secret")).status_code == 403
        (policies / "more.yaml").write_text(
            "version: 1\nroutes:\n  GET /secret:\n    public: true\n"
        )
        assert engine.reload() is None
        assert (await c.get("/secret")).status_code == 200
        (policies / "more.yaml").write_text(
            "version: 1\nroutes:\n  GET /secret:\n    publik: true\n"
        )
        error = engine.reload()
        assert error is not None and "did you mean 'public'" in str(error)
        assert engine.last_reload_error is error
        assert (await c.get("/secret")).status_code == 200  # the last good policy still rules


async def test_websocket_without_policy_is_closed(policies: Path) -> None:
    app = make_app()
    policyroute.install(app, policies)
    messages: list[dict[str, object]] = []
    inbox: list[dict[str, object]] = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, object]:
        message: dict[str, object] = inbox.pop(0) if inbox else {"type": "websocket.disconnect"}
        return message

    async def send(message: dict[str, object]) -> None:
        messages.append(message)

    scope = scope_of("websocket", "/ws", subprotocols=[])
    await app(scope, receive, send)  # type: ignore[arg-type]
    assert messages[0]["type"] == "websocket.close"
    assert messages[0]["code"] == 1008


async def test_denial_raised_by_a_handler_is_problem_json(policy_dir: Path) -> None:
    (policy_dir / "a.yaml").write_text("version: 1\nroutes:\n  GET /raise:\n    public: true\n")
    app = FastAPI()

    @app.get("/raise")
    async def raising() -> None:
        raise policyroute.Denial(
            policyroute.errors.Problems.RATE_LIMITED, "slow down", headers={"Retry-After": "3"}
        )

    policyroute.install(app, policy_dir)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/raise")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:policyroute:problem:rate-limited"


async def test_one_router_included_twice_follows_each_prefix_policy(policy_dir: Path) -> None:
    (policy_dir / "a.yaml").write_text("version: 1\nroutes:\n  GET /v1/thing:\n    public: true\n")
    router = APIRouter()

    @router.get("/thing")
    async def thing() -> dict[str, bool]:
        return {"thing": True}

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    app.include_router(router, prefix="/v2")
    policyroute.install(app, policy_dir)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/v1/thing")).status_code == 200
        assert_denied(await c.get("/v2/thing"))


async def test_denial_comes_before_the_body_is_parsed(policies: Path) -> None:
    app = FastAPI()

    @app.post("/secret")
    async def takes_body(payload: dict[str, int]) -> dict[str, str]:
        return {"secret": "leaked"}

    policyroute.install(app, policies)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/secret", content=b"{not json", headers={"content-type": "application/json"})
    assert_denied(response)  # a 422 here would mean the body was read before the policy ran


async def test_startup_freezes_the_heap_unless_told_not_to(policies: Path) -> None:
    """Objects alive at startup leave the collector's reach (short full collections)."""
    import gc

    from asgi_lifespan import LifespanManager

    for freeze in (False, True):
        gc.unfreeze()
        app = make_app()
        policyroute.install(app, policies, settings=policyroute.Settings(gc_freeze=freeze))
        async with LifespanManager(app):
            assert (gc.get_freeze_count() > 0) is freeze
    gc.unfreeze()


async def test_startup_sets_the_young_generation_threshold_unless_told_not_to(
    policies: Path,
) -> None:
    import gc

    from asgi_lifespan import LifespanManager

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, before[1], before[2])
        for young, expected in ((0, 700), (25_000, 25_000)):
            app = make_app()
            settings = policyroute.Settings(gc_freeze=False, gc_threshold=young)
            policyroute.install(app, policies, settings=settings)
            async with LifespanManager(app):
                assert gc.get_threshold() == (expected, before[1], before[2])
    finally:
        gc.set_threshold(*before)
