"""`settings.api_docs: public`: FastAPI's documentation routes open without an entry each,
and nothing else opens with them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

import policyroute
from policyroute.cli import main
from policyroute.errors import ConfigError
from policyroute.review.lint import lint

from .conftest import REPO

JWKS = REPO / "examples" / "keys" / "dev-jwks.json"
DOCS = ["/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"]


def policy(settings: str = "  api_docs: public\n", routes: str = "") -> str:
    """A policy for `make_app`'s own route; `settings` is indented under `settings:`."""
    return (
        "version: 1\nsettings:\n  auth:\n    issuers:\n"
        f"      - {{issuer: https://auth.example.com/, audience: io-api, jwks: {JWKS}}}\n"
        f"{settings}routes:\n  GET /items:\n    public: true\n{routes}"
    )


def make_app(**options: str | None) -> FastAPI:
    """One route of the app's, and FastAPI's documentation routes as `options` configure."""
    app = FastAPI(**options)  # type: ignore[arg-type]

    @app.get("/items")
    async def items() -> list[str]:
        return []

    return app


@asynccontextmanager
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A started app and a client of it."""
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as c,
    ):
        yield c


async def test_the_setting_opens_each_documentation_route_and_strict_accepts_the_app(
    policy_dir: Path,
) -> None:
    (policy_dir / "api.yaml").write_text(policy())
    app = make_app()
    policyroute.install(app, policy_dir, strict=True)  # the docs need no entry of their own
    async with client(app) as c:
        for path in DOCS:
            answer = await c.get(path)
            assert answer.status_code == 200, path
        assert (await c.head("/docs")).status_code == 200
        assert (await c.get("/openapi.json")).json()["paths"]["/items"]
        assert (await c.post("/docs")).status_code == 405
        assert (await c.get("/docs/other")).status_code == 404  # no route: nothing opened
    assert lint([policy_dir], app) == []


async def test_without_the_setting_they_are_routes_without_a_policy(policy_dir: Path) -> None:
    (policy_dir / "api.yaml").write_text(policy(settings=""))
    with pytest.raises(ConfigError) as refused:
        policyroute.install(make_app(), policy_dir, strict=True)
    assert sorted(f.message.split()[3] for f in refused.value.findings) == sorted(DOCS)
    app = make_app()
    policyroute.install(app, policy_dir)
    async with client(app) as c:
        for path in DOCS:
            assert (await c.get(path)).status_code == 403, path
    assert {f.code for f in lint([policy_dir], app)} == {"no-policy"}


def own_docs_app() -> FastAPI:
    """An app that serves no docs of FastAPI's, with handlers of its own at their URLs (and
    below them) and a mounted FastAPI app that serves its own."""
    app = make_app(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/docs")
    async def docs() -> str:
        return "mine"

    @app.get("/openapi.json")
    async def spec() -> str:
        return "mine"

    @app.get("/docs/oauth2-redirect/{rest:path}")
    async def below(rest: str) -> str:
        return rest

    app.mount("/v2", FastAPI())
    return app


async def test_the_setting_never_opens_a_route_of_the_app(policy_dir: Path) -> None:
    (policy_dir / "api.yaml").write_text(policy())
    with pytest.raises(ConfigError) as refused:
        policyroute.install(own_docs_app(), policy_dir, strict=True)
    unlisted = {f.message.split()[3] for f in refused.value.findings}
    assert {"/docs", "/openapi.json", "/docs/oauth2-redirect/{rest:path}"} <= unlisted
    app = own_docs_app()
    policyroute.install(app, policy_dir)
    async with client(app) as c:
        for path in ["/docs", "/openapi.json", "/docs/oauth2-redirect/x", "/v2/docs",
                     "/v2/openapi.json", "/v2/docs/oauth2-redirect", "/v2/redoc"]:  # fmt: skip
            assert (await c.get(path)).status_code == 403, path
        assert (await c.get("/redoc")).status_code == 404


async def test_a_listed_documentation_route_keeps_its_own_policy(policy_dir: Path) -> None:
    (policy_dir / "api.yaml").write_text(
        policy(routes="  GET /openapi.json:\n    scopes: [read:docs]\n")
    )
    app = make_app(docs_url="/api-docs", redoc_url=None)
    policyroute.install(app, policy_dir, strict=True)
    async with client(app) as c:
        assert (await c.get("/openapi.json")).status_code == 401  # its entry, not the setting
        assert (await c.get("/api-docs")).status_code == 200  # wherever the app serves them
        assert (await c.get("/docs/oauth2-redirect")).status_code == 200
        assert (await c.get("/docs")).status_code == 404


def test_explain_names_the_setting_as_the_origin(
    policy_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert main(["explain", "--app", "examples.app:app", "GET /redoc"]) == 0
    out = capsys.readouterr().out
    setting = next(
        i for i, line in enumerate((REPO / "examples/policies/service.yaml").read_text().splitlines(), 1)
        if line.startswith("  api_docs:")
    )
    assert out.startswith(f"GET /redoc  (examples/policies/service.yaml:{setting}:3)")
    assert f"public: true   <- settings.api_docs at examples/policies/service.yaml:{setting}:3" in out
