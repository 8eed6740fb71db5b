"""Hot reload: the watch, the atomic swap, refused changes (findings, metric), SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from prometheus_client import REGISTRY

import policyroute
from policyroute.admin import credits
from policyroute.engine.engine import Engine
from policyroute.engine.reload import Hangup, Reloader, is_policy_change
from tests.servers import policyroute_run

OPEN_A = "version: 1\nroutes:\n  GET /a:\n    public: true\n"
OPEN_B = "version: 1\nroutes:\n  GET /b:\n    public: true\n"


def make_app() -> FastAPI:
    """Two plain routes."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/a")
    async def a() -> dict[str, str]:
        return {"route": "a"}

    @app.get("/b")
    async def b() -> dict[str, str]:
        return {"route": "b"}

    return app


@asynccontextmanager
async def serving(
    policy_dir: Path, *, reload: bool, valkey_url: str | None = None, app: FastAPI | None = None
) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    """An installed, started app and a client of it."""
    app = app or make_app()
    settings = policyroute.Settings(
        reload=reload, valkey_url=valkey_url, key_prefix="t" + uuid.uuid4().hex[:10]
    )
    engine = policyroute.install(app, policy_dir, settings=settings)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        reloader = engine.services.get("reloader")
        if isinstance(reloader, Reloader):
            await reloader.ready()
        yield engine, client


async def until(check: Callable[[], Awaitable[bool]]) -> float:
    """Poll until `check()` holds (at most 5 s); return the seconds it took."""
    started = time.perf_counter()
    async with asyncio.timeout(5.0):
        while not await check():  # noqa: ASYNC110 - observed through requests, as a user would
            await asyncio.sleep(0.01)
    return time.perf_counter() - started


def reloads(outcome: str) -> float:
    """The reload counter of one outcome."""
    return REGISTRY.get_sample_value("policyroute_policy_reloads_total", {"outcome": outcome}) or 0


def reload_ok() -> float | None:
    """The reload health gauge."""
    return REGISTRY.get_sample_value("policyroute_policy_reload_ok")


async def test_a_saved_change_reaches_every_route_at_once(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text(OPEN_A)
    async with serving(policy_dir, reload=True) as (_, client):
        assert (await client.get("/a")).status_code == 200
        assert (await client.get("/b")).status_code == 403
        (policy_dir / "routes.yaml").write_text(OPEN_B)

        async def b_open() -> bool:
            return (await client.get("/b")).status_code == 200

        took = await until(b_open)
        # One snapshot: the moment /b follows the new file, /a follows it too.
        assert (await client.get("/a")).status_code == 403
    assert took < 2.0


async def test_an_editor_save_by_rename_of_a_watched_file_reloads(policy_dir: Path) -> None:
    file = policy_dir / "routes.yaml"
    file.write_text(OPEN_A)
    app = make_app()
    settings = policyroute.Settings(reload=True)
    engine = policyroute.install(app, file, settings=settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as c,
    ):
        await engine.services["reloader"].ready()
        (policy_dir / ".routes.yaml.swp").write_text("not yaml: [")
        scratch = policy_dir / "routes.yaml.new"
        scratch.write_text(OPEN_B)
        scratch.replace(file)

        async def b_open() -> bool:
            return (await c.get("/b")).status_code == 200

        await until(b_open)
        assert engine.last_reload_error is None


async def test_an_applied_reload_logs_one_info_line_with_its_files_and_routes(
    policy_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file, other = policy_dir / "routes.yaml", policy_dir / "other.yaml"
    file.write_text(OPEN_A)
    other.write_text("version: 1\nroutes:\n  GET /c:\n    public: true\n")
    caplog.set_level(logging.INFO, logger="policyroute")
    async with serving(policy_dir, reload=True) as (engine, client):
        caplog.clear()
        scratch = policy_dir / "routes.yaml.new"  # one event: an editor's save by rename
        scratch.write_text(OPEN_B)
        scratch.replace(file)

        async def b_open() -> bool:
            return (await client.get("/b")).status_code == 200 and engine.last_reload is not None

        await until(b_open)
        await asyncio.sleep(0.2)  # a second event of the same save would log a second line
    lines = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()]
    assert lines == [f"policyroute: policies reloaded: {file}: 2 routes changed (GET /a, GET /b)"]
    assert [r.levelname for r in caplog.records if "reloaded" in r.getMessage()] == ["INFO"]


def test_only_policy_files_trigger_a_reload(tmp_path: Path) -> None:
    dirs, files = {str(tmp_path)}, {str(tmp_path / "other" / "one.yml")}
    assert is_policy_change(str(tmp_path / "a.yaml"), files, dirs)
    assert is_policy_change(str(tmp_path / "other" / "one.yml"), files, dirs)
    assert not is_policy_change(str(tmp_path / ".#a.yaml"), files, dirs)  # an editor lock
    assert not is_policy_change(str(tmp_path / "a.yaml.swp"), files, dirs)
    assert not is_policy_change(str(tmp_path / "other" / "two.yaml"), files, dirs)


async def test_a_broken_change_keeps_the_last_good_policy_and_says_where(
    policy_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = policy_dir / "routes.yaml"
    file.write_text(OPEN_A)
    caplog.set_level(logging.ERROR, logger="policyroute")
    async with serving(policy_dir, reload=True) as (engine, client):
        refused_before = reloads("refused")
        file.write_text(OPEN_A + "  GET /b:\n    publik: true\n")

        async def refused() -> bool:
            # A save may show as two events (truncate, write): wait for the written file's.
            error = engine.last_reload_error
            logged = "error[unknown-key]" in caplog.text
            counted = reloads("refused") > refused_before and reload_ok() == 0
            return (
                logged and counted and error is not None and error.findings[0].code == "unknown-key"
            )

        await until(refused)
        [finding] = engine.last_reload_error.findings  # type: ignore[union-attr]
        assert (finding.code, finding.location.line, finding.location.column) == (
            "unknown-key",
            6,
            5,
        )
        assert f"{file}:6:5: error[unknown-key]" in caplog.text
        assert reloads("refused") >= refused_before + 1
        assert reload_ok() == 0
        assert (await client.get("/a")).status_code == 200  # the last good policy rules
        assert (await client.get("/b")).status_code == 403

        applied_before = reloads("applied")
        file.write_text(OPEN_A + "  GET /b:\n    public: true\n")

        async def fixed() -> bool:
            counted = reloads("applied") > applied_before and reload_ok() == 1
            return counted and (await client.get("/b")).status_code == 200

        await until(fixed)
        assert engine.last_reload_error is None
        assert reloads("applied") >= applied_before + 1
        assert reload_ok() == 1


async def test_a_change_with_lint_errors_is_refused(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text(OPEN_A)
    async with serving(policy_dir, reload=False) as (engine, client):
        (policy_dir / "routes.yaml").write_text(
            OPEN_A + "  GET /b:\n    scopes: [read:b]\n    cache: {ttl: 1m, shared: true}\n"
        )
        error = await asyncio.to_thread(engine.reload)
        assert error is not None
        # GET /b also needs a token that no issuer could verify: both are reported at once.
        assert [f.code for f in error.findings] == ["no-issuer", "shared-cache-authenticated"]
        assert engine.last_reload_error is error
        assert (await client.get("/b")).status_code == 403


async def test_reload_is_off_unless_enabled(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text(OPEN_A)
    async with serving(policy_dir, reload=False) as (engine, client):
        assert "reloader" not in engine.services
        (policy_dir / "routes.yaml").write_text(OPEN_B)
        await asyncio.sleep(0.4)
        assert (await client.get("/a")).status_code == 200
        assert (await client.get("/b")).status_code == 403


CHARGED = """\
version: 1
routes:
  GET /work:
    public: true
    credits: {cost: COST}
"""


async def test_a_request_in_flight_keeps_the_chain_it_started_with(
    policy_dir: Path, valkey_url: str
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/work")
    async def work() -> dict[str, bool]:
        entered.set()
        await release.wait()
        return {"done": True}

    (policy_dir / "routes.yaml").write_text(CHARGED.replace("COST", "1"))
    async with serving(policy_dir, reload=False, valkey_url=valkey_url, app=app) as (engine, c):
        store = engine.services["valkey"]
        await credits.grant(store, "127.0.0.1", 10, ip=True)
        pending = asyncio.create_task(c.get("/work"))
        await entered.wait()  # reserved 1 credit under the old chain
        (policy_dir / "routes.yaml").write_text(CHARGED.replace("COST", "5"))
        assert await asyncio.to_thread(engine.reload) is None
        release.set()
        first = await pending
        after_first = (await credits.show(store, "127.0.0.1", ip=True)).total
        second = await c.get("/work")
        after_second = (await credits.show(store, "127.0.0.1", ip=True)).total
    assert (first.status_code, second.status_code) == (200, 200)
    # Old chain from start to finish (reserve 1, commit 1), then the new one (5).
    assert (after_first, after_second) == (9, 4)


async def test_no_sighup_handler_outside_a_server(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text(OPEN_A)
    before = signal.getsignal(signal.SIGHUP)
    async with serving(policy_dir, reload=False) as (engine, _):
        [hangup] = [s for s in engine.services.values() if isinstance(s, Hangup)]
        assert hangup.installed is False
        assert signal.getsignal(signal.SIGHUP) == before


PROBE_APP = """\
from fastapi import FastAPI

import policyroute

app = FastAPI()


@app.get("/probe")
async def probe() -> dict[str, bool]:
    return {"ok": True}


policyroute.install(app)
"""


def wait_status(url: str, status: int, timeout: float = 15.0) -> None:
    """Poll `url` until it answers `status`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=1.0).status_code
            if last == status:
                return
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{url} never answered {status} (last: {last})")


def test_sighup_reloads_under_policyroute_run(
    tmp_path: Path, valkey_url: str, pulsar_url: str
) -> None:
    (tmp_path / "probe_app.py").write_text(PROBE_APP)
    policies = tmp_path / "policies"
    policies.mkdir()
    file = policies / "routes.yaml"
    file.write_text("version: 1\nroutes:\n  GET /probe:\n    public: true\n")
    with policyroute_run(
        tmp_path, "probe_app:app", policies, valkey_url, pulsar_url, probe="/probe"
    ) as run:
        url = f"{run.base}/probe"
        server, log = run.proc, run.log
        wait_status(url, 200)
        file.write_text("version: 1\nroutes:\n  GET /other:\n    public: true\n")
        time.sleep(0.5)
        assert httpx.get(url).status_code == 200  # no watch unless enabled
        server.send_signal(signal.SIGHUP)
        wait_status(url, 403)  # the new policy: /probe has none
        file.write_text("version: 1\nroutes:\n  GET /probe:\n    publik: true\n")
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while b"reload refused" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(url).status_code == 403  # the last good policy stays
        assert server.poll() is None  # SIGHUP did not end the server
    text = log.read_text(errors="replace")
    assert f"{file}:4:5: error[unknown-key] unknown key 'publik'" in text


def _version(name: str, allow: str) -> str:
    return (
        "version: 1\nroutes:\n  GET /a:\n    public: true\n"
        f"    ip_allowlist: [{allow}]\n"
        f"    rate_limit: {{name: {name}, key: ip, capacity: 1000000, per: 1m}}\n"
        "  GET /b:\n    public: true\n"
    )


async def test_reloads_under_load_never_show_a_request_a_mix(
    policy_dir: Path, valkey_url: str
) -> None:
    """Version A lets 127.0.0.1 in with limit `alpha`; version B refuses it at the allowlist
    and names its limit `beta`. A request that saw B's guards would be refused before any
    limit; one that passed A's guards but ran B's limits would answer 200 with `beta`."""
    a, b = _version("alpha", "127.0.0.1/32"), _version("beta", "10.0.0.0/8")
    (policy_dir / "routes.yaml").write_text(a)
    seen: dict[str, int] = {"alpha": 0, "refused": 0}
    async with serving(policy_dir, reload=False, valkey_url=valkey_url) as (engine, c):
        stop = time.monotonic() + 2.0

        async def client() -> None:
            while time.monotonic() < stop:
                answer = await c.get("/a")
                if answer.status_code == 200:
                    assert answer.headers["ratelimit-policy"].startswith('"alpha"'), answer.headers
                    seen["alpha"] += 1
                else:
                    assert answer.status_code == 403, answer.text
                    assert answer.json()["type"].endswith("ip-not-allowed")
                    assert "ratelimit-policy" not in answer.headers
                    seen["refused"] += 1
                await asyncio.sleep(0)  # a refusal never awaits I/O; let the others run

        async def reloads() -> int:
            done = 0
            while time.monotonic() < stop:
                (policy_dir / "routes.yaml").write_text(b if done % 2 == 0 else a)
                # Swapped between the awaits of requests that are half way through a chain.
                assert engine.reload() is None
                done += 1
                await asyncio.sleep(0.02)
            return done

        swaps = asyncio.create_task(reloads())
        await asyncio.gather(swaps, *(client() for _ in range(20)))
    assert swaps.result() >= 10
    assert seen["alpha"] > 0 and seen["refused"] > 0  # both versions served under load
