"""Policy workflow timings: lint of a 1,000-route policy set, and reload from save to effect.

    .venv/bin/python -m bench.workflow      # alone (also run by `python -m bench`)

Lint: a generated set of 1,000 routes over four files (defaults, profiles, limits,
credits, idempotency, cache, retry, breaker, public routes), linted alone and against a
FastAPI app with the same 1,000 routes. Target: under one second.

Reload: an app with reload on (the watch of `POLICYROUTE_RELOAD`) over a 100-route
set; each sample rewrites one file so `GET /probe` flips between public (200) and no
policy (403), and times from the write to the first request that sees the new policy.
Target: the median within 300 ms. Also shown: load + lint + compile of the 1,000-route
set (what a reload of that set costs off the request path).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI

REPO = Path(__file__).resolve().parent.parent
JWKS = REPO / "examples" / "keys" / "dev-jwks.json"
LINT_ROUTES = 1000
RELOAD_ROUTES = 100
LINT_TARGET_S = 1.0
RELOAD_TARGET_S = 0.300
FILES = 4

OPEN = "version: 1\nroutes:\n  GET /probe:\n    public: true\n"
CLOSED = "version: 1\nroutes: {}\n"


@dataclass(frozen=True, slots=True)
class Timing:
    """Several samples of one measurement, in seconds."""

    name: str
    samples: tuple[float, ...]
    target: float | None = None
    target_text: str = ""

    @property
    def median(self) -> float:
        """The median sample."""
        return statistics.median(self.samples)

    @property
    def worst(self) -> float:
        """The slowest sample."""
        return max(self.samples)

    def verdict(self) -> str:
        """met / MISSED against the target (on the median), or info."""
        if self.target is None:
            return "info"
        return "met" if self.median < self.target else "MISSED"


# (method, path, policy body) of each kind of generated route; `{i}` is the route number.
KINDS = (
    (
        "POST",
        "/r{i}/jobs",
        "    use: [writer]\n    scopes: [write:r{i}]\n    retry: {{attempts: 2}}\n",
    ),
    (
        "GET",
        "/r{i}/items/{{item_id}}",
        "    scopes: [read:r{i}]\n    cache: {{ttl: 30s}}\n    breaker: {{failures: 5}}\n",
    ),
    (
        "GET",
        "/r{i}/status",
        "    public: true\n    rate_limit: {{key: ip, capacity: 10, refill: 10, per: 1s}}\n",
    ),
    (
        "PUT",
        "/r{i}/items/{{item_id}}",
        "    use: [writer]\n    scopes: [write:r{i}]\n    roles: [a]\n",
    ),
    (
        "GET",
        "/r{i}/search",
        "    scopes: [search:r{i}]\n"
        "    rate_limit: {{key: user, algorithm: sliding_window, capacity: 5, per: 10s}}\n",
    ),
)


def route_block(i: int) -> tuple[str, str, str]:
    """Method, path and policy body of generated route `i` (a mix of every kind)."""
    method, path, body = KINDS[i % len(KINDS)]
    return method, path.format(i=i), body.format(i=i)


def write_policy_set(directory: Path, routes: int) -> list[tuple[str, str]]:
    """Write a generated policy set of `routes` routes; return (method, path) of each."""
    directory.mkdir(parents=True, exist_ok=True)
    head = (
        "version: 1\nsettings:\n  auth:\n    issuers:\n"
        f"      - {{issuer: https://auth.example.com/, audience: io-api, jwks: {JWKS}}}\n"
        "  trusted_proxies: [10.0.0.0/8]\n"
        "defaults:\n  rate_limit: {key: user, capacity: 100, refill: 100, per: 1m}\n"
        "profiles:\n  writer:\n    credits: {cost: 1}\n"
        "    idempotency: {required: true}\n"
    )
    made: list[tuple[str, str]] = []
    per_file = -(-routes // FILES)
    for f in range(FILES):
        lines = [head if f == 0 else "version: 1\n", "routes:\n"]
        for i in range(f * per_file, min(routes, (f + 1) * per_file)):
            method, path, body = route_block(i)
            lines.append(f"  {method} {path}:\n{body}")
            made.append((method, path))
        (directory / f"routes_{f}.yaml").write_text("".join(lines))
    return made


def app_for(routes: list[tuple[str, str]], *, probe: bool = False) -> FastAPI:
    """A FastAPI app with one trivial endpoint per route (and `GET /probe`)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    async def endpoint() -> dict[str, bool]:
        return {"ok": True}

    for method, path in routes:
        app.add_api_route(path, endpoint, methods=[method])
    if probe:
        app.add_api_route("/probe", endpoint, methods=["GET"])
    return app


def sample(fn: Callable[[], object], times: int) -> tuple[float, ...]:
    """Wall-clock seconds of `times` calls of `fn`."""
    out = []
    for _ in range(times):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return tuple(out)


def lint_timings(work: Path, samples: int = 5) -> list[Timing]:
    """Lint of the 1,000-route set, alone and against its app; load+lint+compile."""
    from policyroute.backends.offline import OFFLINE_VALKEY_URL
    from policyroute.compile.compiler import Env, compile_all
    from policyroute.engine.reload import check
    from policyroute.language.loader import load_policies
    from policyroute.resilience import with_profiles
    from policyroute.review.lint import lint

    directory = work / "lint"
    routes = write_policy_set(directory, LINT_ROUTES)
    app = app_for(routes)
    findings = lint([directory], app)
    if findings:
        raise RuntimeError(f"the generated set should lint clean: {findings[:3]}")

    def compile_set() -> None:
        from policyroute.backends.valkey import ValkeyStore

        policies = load_policies(directory)
        check(policies)
        services = {"valkey": ValkeyStore(OFFLINE_VALKEY_URL)}
        compile_all(policies, Env(policies.settings, services=with_profiles(policies, services)))

    lint_text = f"< {LINT_TARGET_S:g} s"
    return [
        Timing(
            f"lint, {LINT_ROUTES:,} routes",
            sample(lambda: lint([directory]), samples),
            LINT_TARGET_S,
            lint_text,
        ),
        Timing(
            f"lint, {LINT_ROUTES:,} routes + --app",
            sample(lambda: lint([directory], app), samples),
            LINT_TARGET_S,
            lint_text,
        ),
        Timing(
            f"reload work (load, lint, compile), {LINT_ROUTES:,} routes",
            sample(compile_set, samples),
        ),
    ]


async def reload_timing(work: Path, valkey_url: str, samples: int = 9) -> Timing:
    """From a file write to the first request that sees the new policy."""
    from asgi_lifespan import LifespanManager

    import policyroute
    from policyroute.engine.reload import Reloader

    directory = work / "reload"
    routes = write_policy_set(directory, RELOAD_ROUTES)
    probe = directory / "probe.yaml"
    probe.write_text(OPEN)
    app = app_for(routes, probe=True)
    settings = policyroute.Settings(
        valkey_url=valkey_url, reload=True, key_prefix="bench" + uuid.uuid4().hex[:6]
    )
    engine = policyroute.install(app, directory, settings=settings)
    transport = httpx.ASGITransport(app=app)
    took: list[float] = []
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench") as client,
    ):
        reloader = engine.services["reloader"]
        assert isinstance(reloader, Reloader)
        await reloader.ready()
        if (await client.get("/probe")).status_code != 200:
            raise RuntimeError("the probe route should start public")
        for i in range(samples):
            text, expected = (CLOSED, 403) if i % 2 == 0 else (OPEN, 200)
            started = time.perf_counter()
            probe.write_text(text)
            while (await client.get("/probe")).status_code != expected:
                if time.perf_counter() - started > 5:
                    raise RuntimeError(f"reload not seen within 5 s: {engine.last_reload_error}")
                await asyncio.sleep(0.002)
            took.append(time.perf_counter() - started)
            await asyncio.sleep(0.25)  # let the watch settle between samples
    return Timing(
        f"reload, save to effect ({RELOAD_ROUTES} routes, watch)",
        tuple(took),
        RELOAD_TARGET_S,
        f"<= {RELOAD_TARGET_S * 1000:.0f} ms",
    )


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def table(timings: list[Timing]) -> str:
    """The results and the targets, one line each."""
    width = max(len(t.name) for t in timings)
    lines = [f"{'workflow':<{width}}  {'median':>8}  {'max':>8}  {'n':>2}  target"]
    for t in timings:
        target = f"{t.target_text:<9} {t.verdict()}" if t.target is not None else "info"
        lines.append(
            f"{t.name:<{width}}  {_seconds(t.median):>8}  {_seconds(t.worst):>8}  "
            f"{len(t.samples):>2}  {target}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and the targets; missed targets are reported, not fatal."""
    from policyroute.backends.embedded import start_valkey

    work = Path(tempfile.mkdtemp(prefix="policyroute-workflow-"))
    print("[bench] workflow: lint and reload timings", file=sys.stderr, flush=True)
    valkey = start_valkey()
    try:
        timings = lint_timings(work)
        timings.append(asyncio.run(reload_timing(work, valkey.url)))
    finally:
        valkey.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + table(timings))
    print(
        f"\ntargets: 1,000-route lint < {LINT_TARGET_S:g} s; "
        f"reload effective within {RELOAD_TARGET_S * 1000:.0f} ms of the save"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
