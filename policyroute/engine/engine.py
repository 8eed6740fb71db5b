"""Bind compiled chains to a FastAPI (Starlette) app's routes; the engine that owns them."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..asgi._problem import CONTENT_TYPE, problem_bytes
from ..asgi.api_docs import with_api_docs
from ..asgi.chain import BoundChain, Chain
from ..asgi.gate import Endpoint, endpoints, gate_router
from ..compile.compiler import Env, compile_all, deny_chain
from ..config import Settings
from ..errors import ConfigError, Denial, Finding, Location
from ..language.loader import PolicySet, RouteEntry, load_policies
from ..language.policy import normalize_path
from ..observability.repeats import BACKEND as BACKEND_WARNINGS
from ..observability.requests import RequestIds
from ..resilience import bind as bind_resilience
from ..steps.base import Step
from . import _fatal
from .observe import observe, request_ids
from .reload import Reloaded, file_digests
from .services import default_services

log = logging.getLogger("policyroute")

ServiceFactory = Callable[["Engine"], Mapping[str, Any]]


def unpolicied(endpoint: Endpoint, policies: PolicySet) -> list[str]:
    """Methods of an endpoint no policy governs (HEAD only when there is no GET: it follows
    GET); every method of an endpoint the gate does not know."""
    if not endpoint.known:
        return list(endpoint.methods)
    return [
        m
        for m in endpoint.methods
        if policies.get(m, endpoint.path) is None
        and not (m == "HEAD" and "GET" in endpoint.methods)
    ]


@dataclass(slots=True)
class Snapshot:
    """Everything one request reads: swapped whole, so a request never sees a mix."""

    policies: PolicySet
    chains: Mapping[tuple[str, str], Chain]
    bound: dict[tuple[str, str], BoundChain]
    ids: RequestIds | None = None
    header_limit: int = 0  # Settings.max_header_bytes: larger header values answer 431

    @classmethod
    def build(
        cls,
        policies: PolicySet,
        chains: Mapping[tuple[str, str], Chain],
        ids: RequestIds | None = None,
        header_limit: int = 0,
    ) -> Snapshot:
        """Bind every compiled chain once (with its route's metrics and shadow mode)."""
        entry = policies.routes.get
        bound = {
            k: BoundChain(c, ids, getattr(entry(k), "policy", None), header_limit)
            for k, c in chains.items()
        }
        return cls(policies, chains, bound, ids, header_limit)

    def _deny_chain(self, method: str, path: str) -> BoundChain:
        return BoundChain(deny_chain(method, path), self.ids, header_limit=self.header_limit)

    def deny(self, method: str, path: str) -> BoundChain:
        """The deny chain of an endpoint the gate does not know (bound once per key)."""
        key = ("!" + method, path)
        found = self.bound.get(key)
        if found is None:
            found = self.bound[key] = self._deny_chain(method, path)
        return found

    def chain_for(self, method: str, path: str) -> BoundChain:
        """The chain for METHOD + template: HEAD follows GET; no policy means deny."""
        found = self.bound.get((method, path))
        if found is None:
            # First request for this spelling of the template: resolve once, then remember
            # it under the raw path so later requests are one dict lookup.
            norm = normalize_path(path)
            found = self.bound.get((method, norm))
            if found is None and method == "HEAD":
                found = self.bound.get(("GET", norm))
            if found is None:
                found = self._deny_chain(method, path)
            self.bound[(method, path)] = found
        return found


class Engine:
    """Owns the loaded policies, the compiled chains and the gates of one app."""

    def __init__(
        self,
        app: FastAPI,
        paths: list[str],
        config: Settings,
        *,
        strict: bool,
        services: ServiceFactory | None = None,
    ) -> None:
        self.app = app
        self.paths = paths
        self.config = config
        self.strict = strict
        self.last_reload_error: ConfigError | None = None
        self.last_reload: Reloaded | None = None  # what the last applied reload changed
        policies = with_api_docs(load_policies(*paths), app)
        self._digests = file_digests(policies.files)
        self.services: Mapping[str, Any] = services(self) if services else {}
        self.ids = request_ids(config)
        self.snapshot = self._build(policies)

    def env(self, policies: PolicySet) -> Env:
        """The compile environment for a policy set."""
        # The hook that lets route makers and `@resilient` see this policy's profiles.
        return Env(policies.settings, self.config, bind_resilience(self, policies))

    def _build(self, policies: PolicySet) -> Snapshot:
        chains = compile_all(policies, self.env(policies))
        return Snapshot.build(policies, chains, self.ids, self.config.max_header_bytes)

    def endpoints(self) -> list[Endpoint]:
        """Every endpoint of the app, as the gate resolves them (lint and explain use these)."""
        return list(endpoints(self.app.router))

    def unpolicied(self) -> list[str]:
        """METHOD + template of every endpoint no policy governs."""
        policies = self.snapshot.policies
        return [f"{m} {e.path}" for e in self.endpoints() for m in unpolicied(e, policies)]

    def check_strict(self) -> None:
        """Under `strict`, refuse an app that has an endpoint no policy governs."""
        if self.strict:
            missing = self.unpolicied()
            if missing:
                raise ConfigError([no_policy_finding(r) for r in missing])

    async def decide(
        self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, app: ASGIApp
    ) -> None:
        """Run the chain of the resolved endpoint around the router's dispatch."""
        method = scope["method"] if scope["type"] == "http" else "GET"
        bound = (
            self.snapshot.chain_for(method, endpoint.path)
            if endpoint.known
            else (self.snapshot.deny(method, endpoint.path))
        )
        await bound(scope, receive, send, app, endpoint.marks_entry)

    def reload(self) -> ConfigError | None:
        """Load, lint, compile and swap all chains at once; keep the old ones on any error."""
        from . import reload as reloader  # the reload checks and metrics

        started = time.perf_counter()
        try:
            policies = load_policies(*self.paths)
            reloader.check(policies)
            policies = with_api_docs(policies, self.app)
            snapshot = self._build(policies)
        except ConfigError as exc:
            self.last_reload_error = exc  # carries every finding, for /readyz
            log.error("policyroute: reload refused, keeping the last good policy:\n%s", exc)
            reloader.record(exc, time.perf_counter() - started)
            return exc
        digests = file_digests(policies.files)
        old = self.snapshot.policies
        self.last_reload = Reloaded.between(old, policies, self._digests, digests)
        self.snapshot = snapshot
        self._digests = digests
        self.last_reload_error = None
        reloader.record(None, time.perf_counter() - started)
        return None

    def chains(self) -> list[Chain]:
        """Every compiled chain, then the deny chains of app routes no policy names."""
        out = list(self.snapshot.chains.values())
        policies = self.snapshot.policies
        for endpoint in self.endpoints():
            out.extend(deny_chain(m, endpoint.path) for m in unpolicied(endpoint, policies))
        return out

    def unmatched_policies(self) -> list[str]:
        """Policy routes that name no route of the app."""
        return [e.key for e in unmatched_entries(self.snapshot.policies, self.endpoints())]


def no_policy_finding(route: str) -> Finding:
    """The finding for an app route (METHOD + template) that no policy governs."""
    return Finding(
        "no-policy",
        f"app route {route} has no policy; it is denied with 403 (add a policy or `public: true`)",
        Location("<app>"),
        (),
    )


def unmatched_entries(policies: PolicySet, found: Iterable[Endpoint]) -> list[RouteEntry]:
    """Policy routes that name no endpoint among `found`."""
    served = {(m, normalize_path(e.path)) for e in found if e.known for m in e.methods}
    return [e for k, e in policies.routes.items() if k not in served]


async def _denial_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Denial)
    return Response(
        problem_bytes(exc, request.url.path),
        status_code=exc.status,
        headers=exc.headers,
        media_type=CONTENT_TYPE.decode(),
    )


def _wrap_lifespan(app: FastAPI, engine: Engine) -> None:
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(inner: Any) -> AsyncIterator[Any]:
        engine.check_strict()  # routes added between `install` and startup
        await engine_start(engine)
        try:
            async with original(inner) as state:
                yield state
        finally:
            await engine_stop(engine)

    app.router.lifespan_context = lifespan


def _steps(engine: Engine) -> list[Step]:
    """Every step of the current chains, once (routes share some, e.g. an authenticator's)."""
    found = {id(s): s for chain in engine.snapshot.chains.values() for s in chain.steps}
    return list(found.values())


async def engine_start(engine: Engine) -> None:
    """Start the services that have a `start` coroutine and the steps' background work."""
    for service in engine.services.values():
        start = getattr(service, "start", None)
        if start is not None:
            await start()
    for step in _steps(engine):
        step.start()
    if engine.config.gc_freeze:
        # Everything alive now (modules, compiled chains, clients) lives as long as the
        # process; freezing it keeps the collector from rescanning it under load, where
        # full collections otherwise stall every request in flight.
        gc.collect()
        gc.freeze()
    young = engine.config.gc_threshold
    if young:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(young, older, oldest)


async def engine_stop(engine: Engine) -> None:
    """Stop the steps' background work, then every service's `stop`, in reverse order."""
    for step in _steps(engine):
        await step.stop()
    for service in reversed(list(engine.services.values())):
        stop = getattr(service, "stop", None)
        if stop is not None:
            await stop()
    BACKEND_WARNINGS.flush()  # counts of repeated warnings not logged yet


def install(
    app: FastAPI,
    *paths: str | Path,
    strict: bool | None = None,
    settings: Settings | None = None,
    services: ServiceFactory | None = None,
    health: bool = False,
    metrics: bool = False,
) -> Engine:
    """Compile the policies and gate every route of `app`; return the engine.

    Routes no policy names answer 403 (deny by default); with `strict=True` they make
    `install` raise `ConfigError` instead. `health=True` adds `GET /healthz` and
    `GET /readyz`, `metrics=True` adds `GET /metrics`: the policy governs them like any
    other route (list them, e.g. `GET /healthz: {public: true}`).
    """
    config = settings or Settings()
    policy_paths = [str(p) for p in paths] or config.policy_paths()
    try:
        engine = Engine(
            app,
            policy_paths,
            config,
            strict=config.strict if strict is None else strict,
            services=services or default_services,
        )
        observe(app, engine, health=health, metrics=metrics)  # sanitized logs, health routes
        gate_router(app.router, engine.decide)
        engine.check_strict()
    except ConfigError:
        _fatal.briefly()  # uncaught, under `uvicorn app:app`: the findings, not a traceback
        raise
    for key in engine.unmatched_policies():
        log.warning("policyroute: policy %s matches no route of the app", key)
    app.add_exception_handler(Denial, _denial_handler)
    _wrap_lifespan(app, engine)
    from . import openapi
    from . import reload as reloader

    openapi.install(app, engine)  # the policy in /openapi.json, updated on reload
    reloader.attach(engine)  # SIGHUP reloads under a server
    app.state.policyroute = engine
    return engine
