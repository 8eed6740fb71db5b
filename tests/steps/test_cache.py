"""cache: per-principal entries, variants, what is stored, the stampede lock, invalidation."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from policyroute.admin import cache as cache_api
from policyroute.admin import credits
from policyroute.backends.keys import digest
from policyroute.backends.valkey import ValkeyStore
from policyroute.cli import main
from policyroute.compile.step import Context
from policyroute.language.policy import Cache
from policyroute.steps.cache import CacheStep, cache_key
from policyroute.steps.parts import Request

from .identity_kit import SETTINGS, bearer, subject, token
from .stateful import client, engine, install, running

POLICY = """\
version: 1
routes:
  GET /cached/{item}:
    public: true
    cache: {ttl: 1s, vary_headers: [Accept-Language]}
  GET /slow:
    public: true
    cache: {ttl: 60s, shared: true}
"""


async def test_callers_never_see_each_others_entries(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as a, client(app, "10.0.0.2") as b:
        a1 = await a.get("/cached/x")
        b1 = await b.get("/cached/x")
        a2 = await a.get("/cached/x")
        b2 = await b.get("/cached/x")
    assert a1.json()["client"] == a2.json()["client"] == "127.0.0.1"
    assert b1.json()["client"] == b2.json()["client"] == "10.0.0.2"
    assert a2.content == a1.content and b2.content == b1.content
    assert a2.headers["x-cache"] == "hit" and "x-cache" not in a1.headers
    assert calls["cached"] == 2


async def test_entries_vary_by_path_query_and_named_headers(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        for _ in range(2):
            await c.get("/cached/x")
            await c.get("/cached/y")
            await c.get("/cached/x?page=2")
            await c.get("/cached/x", headers={"accept-language": "fr"})
            await c.get("/cached/x", headers={"x-other": "ignored"})
    assert calls["cached"] == 4


async def test_only_2xx_without_set_cookie_is_stored(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        for _ in range(2):
            await c.get("/cached/c?cookie=true")
            await c.get("/cached/n?status=404")
            await c.get("/cached/s?status=500")
    assert calls["cached"] == 6


async def test_entries_expire_after_ttl(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        await c.get("/cached/t")
        await c.get("/cached/t")
        await asyncio.sleep(1.1)
        await c.get("/cached/t")
    assert calls["cached"] == 2


async def test_concurrent_misses_run_the_handler_once(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c:
        answers = await asyncio.gather(*(c.get("/slow?sleep=0.2") for _ in range(10)))
    assert [r.status_code for r in answers] == [200] * 10
    assert len({r.content for r in answers}) == 1
    assert calls["slow"] == 1


async def test_invalidate_drops_a_routes_entries(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    async with running(app) as c, client(app, "10.0.0.3") as other:
        store = engine(app).services["valkey"]
        await c.get("/cached/a")
        await c.get("/cached/b")
        await other.get("/cached/a")
        assert await cache_api.invalidate(store, "GET /cached/{item}", "/cached/a") == 2
        await c.get("/cached/a")
        await c.get("/cached/b")
        assert calls["cached"] == 4
        assert await cache_api.invalidate(store, "GET /cached/{item}") == 2
        await c.get("/cached/b")
    assert calls["cached"] == 5


async def test_warm_fills_the_shared_cache(policy_dir: Path, valkey_url: str) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, POLICY, valkey_url, calls)
    assert await cache_api.warm(app, ["/slow"]) == {"/slow": 200}
    async with running(app) as c:
        hit = await c.get("/slow")
    assert hit.headers["x-cache"] == "hit"
    assert calls["slow"] == 1


LOCAL = """\
version: 1
routes:
  GET /cached/{item}:
    public: true
    cache: {ttl: 60s, local: {max_entries: 2, eviction: lru}}
"""


async def test_local_tier_answers_without_valkey_and_evicts(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, LOCAL, valkey_url, calls)
    async with running(app) as c:
        store = engine(app).services["valkey"]
        first = await c.get("/cached/a")
        # Drop the Valkey entry: only the in-process tier can answer now.
        await cache_api.invalidate(store, "GET /cached/{item}")
        second = await c.get("/cached/a")
        assert second.content == first.content and second.headers["x-cache"] == "hit"
        assert calls["cached"] == 1
        await c.get("/cached/b")
        await c.get("/cached/c")  # evicts the least recently used entry, /cached/a
        await cache_api.invalidate(store, "GET /cached/{item}")
        await c.get("/cached/a")
    assert calls["cached"] == 4


def test_cli_warm_gets_listed_paths(
    policy_dir: Path,
    valkey_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (policy_dir / "routes.yaml").write_text(POLICY)
    (tmp_path / "warmapp.py").write_text(
        "from tests.steps.stateful import worker_app\napp = worker_app()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLICYROUTE_POLICIES", str(policy_dir))
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", valkey_url)
    monkeypatch.setenv("POLICYROUTE_KEY_PREFIX", "warm-cli")
    assert main(["cache", "warm", "/slow", "/cached/a", "--app", "warmapp:app"]) == 0
    assert capsys.readouterr().out.splitlines() == ["200 /slow", "200 /cached/a"]
    assert main(["cache", "invalidate", "GET", "/slow", "--app", "warmapp:app"]) == 0
    assert "GET /slow: 1 entries removed" in capsys.readouterr().out


LOCAL_PAID = """\
version: 1
routes:
  GET /cached/{item}:
    public: true
    credits: {cost: 1}
    cache: {ttl: 60s, local: {max_entries: 8}}
"""


async def test_a_first_tier_hit_costs_no_credits_and_no_round_trip(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, LOCAL_PAID, valkey_url, calls)
    async with running(app) as c:
        store = engine(app).services["valkey"]
        await credits.set_balance(store, "127.0.0.1", 5, ip=True)
        assert (await c.get("/cached/a")).status_code == 200
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 4
        sent = store.pipeline.commands
        hit = await c.get("/cached/a")
        assert hit.status_code == 200 and hit.headers["x-cache"] == "hit"
        assert store.pipeline.commands == sent  # answered from process memory alone
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 4
    assert calls["cached"] == 1


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-type", b"application/json"), (b"link", b"<a>; rel=next: x")],
        [],  # no headers: stored as a JSON list
        [(b"x-odd", b"nul\0inside")],  # a NUL in a value: stored as a JSON list
    ],
)
def test_a_stored_response_comes_back_with_the_same_headers(
    headers: list[tuple[bytes, bytes]],
) -> None:
    from policyroute.steps.parts import Stored

    stored = Stored(201, headers, b"\0body")
    assert Stored.decode(*stored.encode()) == stored


CREDENTIALS = """\
version: 1
routes:
  GET /greeting:
    public: true
    cache: {ttl: 60s, local: {max_entries: 8}}
"""
LOGGED_IN = [
    ({"Cookie": "session=alice"}, "alice"),
    ({"Authorization": "Bearer alice-opaque-token"}, "Bearer alice-opaque-token"),
    ({"X-Api-Key": "alice-api-key"}, "alice-api-key"),
]


@pytest.mark.parametrize(("credential", "greeted"), LOGGED_IN, ids=["cookie", "bearer", "api-key"])
async def test_a_response_made_for_credentials_is_never_served_to_another_request(
    policy_dir: Path, valkey_url: str, credential: dict[str, str], greeted: str
) -> None:
    """A public route's entry is keyed by client address: what a logged-in caller got
    must not reach an anonymous caller from the same address, nor another logged-in one."""
    calls: Counter[str] = Counter()
    app = install(policy_dir, CREDENTIALS, valkey_url, calls)
    bypassed = bypasses()
    async with running(app) as c:
        mine = [await c.get("/greeting", headers=credential) for _ in range(2)]
        anonymous = [await c.get("/greeting") for _ in range(2)]
        again = await c.get("/greeting", headers=credential)
    assert [r.json()["hello"] for r in anonymous] == ["stranger", "stranger"]
    assert anonymous[1].headers["x-cache"] == "hit"  # requests without credentials still cache
    assert [r.json()["hello"] for r in [*mine, again]] == [greeted] * 3
    assert all("x-cache" not in r.headers for r in [*mine, again])
    assert calls["greeting"] == 4
    assert bypasses() == bypassed + 3


def bypasses() -> float:
    """policyroute_cache_lookups_total{route="GET /greeting", outcome="bypass"}."""
    labels = {"route": "GET /greeting", "outcome": "bypass"}
    return REGISTRY.get_sample_value("policyroute_cache_lookups_total", labels) or 0.0


AUTHENTICATED = f"""\
version: 1
{SETTINGS}routes:
  GET /greeting:
    cache: {{ttl: 60s}}
"""


async def test_a_verified_bearer_token_is_the_key_but_a_cookie_beside_it_bypasses(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, AUTHENTICATED, valkey_url, calls)
    alice = bearer(token(subject()))
    async with running(app) as c:
        first, second = [await c.get("/greeting", headers=alice) for _ in range(2)]
        with_cookie = await c.get("/greeting", headers={**alice, "Cookie": "session=mallory"})
        after = await c.get("/greeting", headers=alice)
    assert second.headers["x-cache"] == "hit" and second.content == first.content
    assert with_cookie.json()["hello"] == "mallory" and "x-cache" not in with_cookie.headers
    assert after.headers["x-cache"] == "hit" and after.content == first.content
    assert calls["greeting"] == 2


async def test_credentials_the_key_covers_or_the_policy_ignores_are_cached(
    policy_dir: Path, valkey_url: str
) -> None:
    policy = CREDENTIALS.replace("local: {max_entries: 8}", "vary_headers: [Cookie]")
    calls: Counter[str] = Counter()
    app = install(policy_dir, policy, valkey_url, calls)
    async with running(app) as c:
        alice = [await c.get("/greeting", headers={"Cookie": "session=alice"}) for _ in range(2)]
        bob = await c.get("/greeting", headers={"Cookie": "session=bob"})
        anonymous = await c.get("/greeting")
    assert [r.json()["hello"] for r in alice] == ["alice", "alice"]
    assert alice[1].headers["x-cache"] == "hit"
    assert (bob.json()["hello"], anonymous.json()["hello"]) == ("bob", "stranger")

    policy = CREDENTIALS.replace("local: {max_entries: 8}", "ignore_credentials: true")
    calls = Counter()
    app = install(policy_dir, policy, valkey_url, calls)
    async with running(app) as c:
        first = await c.get("/greeting", headers={"Cookie": "session=alice"})
        second = await c.get("/greeting")
    # The policy vouches that the handler ignores credentials: one entry for both.
    assert second.headers["x-cache"] == "hit" and second.content == first.content
    assert calls["greeting"] == 1


@pytest.mark.parametrize(
    "query",
    [b"", b"n=1", b"a=1&b=%C3%A9", b"raw=\xe9\xff", b"q=\x00x", b"k=" + b"v" * 3000],
    ids=["none", "plain", "escaped", "latin-1", "nul", "long"],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_the_key_of_a_variant_is_the_same_whichever_way_it_is_spelled(
    query: bytes, method: str
) -> None:
    """The request path digests the raw query; `cache warm`, `invalidate` and entries stored
    before read it through `vary`: both must name the same entry, byte for byte."""
    step = CacheStep(ValkeyStore("redis://127.0.0.1:1"), Cache(ttl=60))
    scope = {"type": "http", "method": method, "path": "/p", "query_string": query,
             "headers": [], "client": ("127.0.0.1", 1)}
    ctx = Context(scope, _never, _never, f"{method} /p", _never)
    assert step.by_query_only
    assert step.variant(ctx) == digest(step.vary(ctx))


async def _never(*_: object) -> Any:
    raise AssertionError("not called")


@pytest.mark.parametrize("name", [b"cookie", b"Cookie", b"X-API-KEY", b"Authorization"])
def test_a_credential_header_is_seen_whatever_the_case_of_its_name(name: bytes) -> None:
    step = CacheStep(ValkeyStore("redis://127.0.0.1:1"), Cache(ttl=60))
    scope = {"type": "http", "method": "GET", "path": "/p", "query_string": b"",
             "headers": [(b"accept", b"*/*"), (name, b"secret"), (b"x-1", b"")],
             "client": ("127.0.0.1", 1)}  # fmt: skip
    assert step.uncovered(Context(scope, _never, _never, "GET /p", _never))
    scope["headers"] = [(b"accept", b"*/*"), (name, b"  "), (b"X-Other", b"v")]
    assert not step.uncovered(Context(scope, _never, _never, "GET /p", _never))


def test_a_callers_long_path_is_keyed_but_not_remembered() -> None:
    """Each caller's last path is remembered with its key prefix, but only a short one:
    callers by the thousand, each asking for a long path of its own, leave nothing of them
    in memory, and the key is the same either way."""
    step = CacheStep(ValkeyStore("redis://127.0.0.1:1"), Cache(ttl=60))
    long_x, long_y = "/p/" + "x" * 300, "/p/" + "y" * 300
    for path, kept in ((long_x, ""), ("/p/short", "/p/short"), (long_y, "/p/short")):
        scope = {"type": "http", "method": "GET", "path": path, "query_string": b"",
                 "headers": [], "client": ("127.0.0.1", 1)}  # fmt: skip
        ctx = Context(scope, _never, _never, "GET /p/{x}", _never)
        req = Request(ctx)
        step.peek(req)
        assert req.data["ca_key"] == cache_key(
            step.store, "ip:127.0.0.1", "GET /p/{x}", path, step.vary(ctx)
        )
        assert [p for p, _ in step.served.prefixes._made.values()] == [kept]
