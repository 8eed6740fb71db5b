"""Bind compiled chains to a FastAPI (Starlette) app's routes; the engine that owns them."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, SupportsIndex

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ._problem import CONTENT_TYPE, problem_bytes
from .chain import BoundChain, Chain
from .compiler import Env, compile_all, deny_chain
from .config import Settings
from .errors import ConfigError, Denial, Finding, Location
from .loader import PolicySet, RouteEntry, load_policies
from .observability.hooks import observe, request_ids
from .observability.requests import RequestIds
from .policy import METHODS, normalize_path
from .resilience import bind as bind_resilience
from .services import default_services

log = logging.getLogger("policyroute")

ServiceFactory = Callable[["Engine"], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Binding:
    """One app route as the policy sees it: a path template and its methods."""

    path: str
    methods: tuple[str, ...]
    websocket: bool = False

    def unpolicied(self, policies: PolicySet) -> list[str]:
        """Methods no policy governs (HEAD only when there is no GET: it follows GET)."""
        return [
            m
            for m in self.methods
            if policies.get(m, self.path) is None and not (m == "HEAD" and "GET" in self.methods)
        ]


def _binding_of(route: BaseRoute, prefix: str = "") -> Binding | None:
    if isinstance(route, Route):
        methods = tuple(sorted(route.methods)) if route.methods else METHODS
        return Binding(prefix + route.path, methods)
    if isinstance(route, WebSocketRoute):
        return Binding(prefix + route.path, ("GET",), websocket=True)
    if isinstance(route, Mount):
        return Binding(prefix + route.path.rstrip("/") + "/{path:path}", METHODS)
    return None


def _included(route: BaseRoute) -> tuple[Any, str] | None:
    """(router, prefix) of an included router entry (FastAPI keeps them unflattened)."""
    router = getattr(route, "original_router", None)
    context = getattr(route, "include_context", None)
    if router is None or context is None:
        return None
    return router, str(getattr(context, "prefix", ""))


def walk_routes(
    routes: Iterable[BaseRoute], prefix: str = ""
) -> Iterator[tuple[BaseRoute, Binding | None]]:
    """Every route reachable from a route list, with its full path template."""
    for route in list(routes):
        nested = _included(route)
        if nested is not None:
            router, sub = nested
            yield from walk_routes(router.routes, prefix + sub)
            continue
        yield route, _binding_of(route, prefix)


def _effective_path(scope: Scope) -> str | None:
    # Routes of an included router are shared by every inclusion; FastAPI records which
    # inclusion (and so which full path template) matched in the scope.
    context = scope.get("fastapi", {}).get("effective_route_context")
    return getattr(context, "path", None) if context is not None else None


class Gate:
    """Replaces a route's `handle`: runs the current chain for METHOD + template first."""

    __slots__ = ("binding", "engine", "handle", "route")

    def __init__(self, engine: Engine, route: BaseRoute, binding: Binding, handle: ASGIApp) -> None:
        self.engine = engine
        self.route = route
        self.binding = binding
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = "GET" if scope["type"] == "websocket" else scope["method"]
        if method not in self.binding.methods:
            await self.handle(scope, receive, send)  # the route answers 405 itself
            return
        path = _effective_path(scope) or self.binding.path
        bound = self.engine.snapshot.chain_for(method, path)
        await bound(scope, receive, send, self.handle)


@dataclass(slots=True)
class Snapshot:
    """Everything one request reads: swapped whole, so a request never sees a mix."""

    policies: PolicySet
    chains: Mapping[tuple[str, str], Chain]
    bound: dict[tuple[str, str], BoundChain]
    ids: RequestIds | None = None

    @classmethod
    def build(
        cls,
        policies: PolicySet,
        chains: Mapping[tuple[str, str], Chain],
        ids: RequestIds | None = None,
    ) -> Snapshot:
        """Bind every compiled chain once (with its route's metrics and shadow mode)."""
        entry = policies.routes.get
        bound = {
            k: BoundChain(c, ids, getattr(entry(k), "policy", None)) for k, c in chains.items()
        }
        return cls(policies, chains, bound, ids)

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
                found = BoundChain(deny_chain(method, path), self.ids)
            self.bound[(method, path)] = found
        return found


class GatedRoutes(list[BaseRoute]):
    """A router's route list; a route added after `install` is gated as it is added."""

    engine: Engine
    prefix: str = ""

    def append(self, route: BaseRoute) -> None:
        """Add a route and gate it."""
        super().append(route)
        self.engine.gate_all([route], self.prefix)

    def insert(self, index: SupportsIndex, route: BaseRoute) -> None:
        """Insert a route and gate it."""
        super().insert(index, route)
        self.engine.gate_all([route], self.prefix)

    def extend(self, routes: Iterable[BaseRoute]) -> None:
        """Add several routes and gate each."""
        for route in routes:
            self.append(route)


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
        self.gates: list[Gate] = []
        self.last_reload_error: ConfigError | None = None
        policies = load_policies(*paths)
        self.services: Mapping[str, Any] = services(self) if services else {}
        self.ids = request_ids(config)
        self.snapshot = self._build(policies)

    def env(self, policies: PolicySet) -> Env:
        """The compile environment for a policy set."""
        # The hook that lets route makers and `@resilient` see this policy's profiles.
        return Env(policies.settings, self.config, bind_resilience(self, policies))

    def _build(self, policies: PolicySet) -> Snapshot:
        return Snapshot.build(policies, compile_all(policies, self.env(policies)), self.ids)

    def gate_all(self, routes: Iterable[BaseRoute], prefix: str = "") -> list[str]:
        """Gate every route reachable from `routes`; return the bindings with no policy."""
        unbound: list[str] = []
        for route in list(routes):
            nested = _included(route)
            if nested is not None:
                router, sub = nested
                self._gate_router(router, prefix + sub)
                unbound.extend(self.gate_all(router.routes, prefix + sub))
                continue
            unbound.extend(self._gate_one(route, prefix))
        if self.strict and unbound:
            raise ConfigError([no_policy_finding(r) for r in unbound])
        return unbound

    def _gate_router(self, router: Any, prefix: str) -> None:
        if not isinstance(router.routes, GatedRoutes):
            gated = GatedRoutes(router.routes)
            gated.engine = self
            gated.prefix = prefix
            router.routes = gated

    def _gate_one(self, route: BaseRoute, prefix: str) -> list[str]:
        current = route.__dict__.get("handle")
        if isinstance(current, Gate):
            return []
        binding = _binding_of(route, prefix)
        if binding is None:
            log.warning("policyroute: unknown route type %s is denied", type(route).__name__)
            binding = Binding(prefix + str(getattr(route, "path", "/")), METHODS)
        gate = Gate(self, route, binding, route.handle)
        route.handle = gate  # type: ignore[method-assign]
        self.gates.append(gate)
        return [f"{m} {binding.path}" for m in binding.unpolicied(self.snapshot.policies)]

    def reload(self) -> ConfigError | None:
        """Load, lint, compile and swap all chains at once; keep the old ones on any error."""
        from . import reloader  # the reload checks and metrics

        started = time.perf_counter()
        try:
            policies = load_policies(*self.paths)
            reloader.check(policies)
            snapshot = self._build(policies)
        except ConfigError as exc:
            self.last_reload_error = exc  # carries every finding, for /readyz
            log.error("policyroute: reload refused, keeping the last good policy:\n%s", exc)
            reloader.record(exc, time.perf_counter() - started)
            return exc
        self.snapshot = snapshot
        self.last_reload_error = None
        reloader.record(None, time.perf_counter() - started)
        return None

    def chains(self) -> list[Chain]:
        """Every compiled chain, then the deny chains of app routes no policy names."""
        out = list(self.snapshot.chains.values())
        for _, binding in walk_routes(self.app.router.routes):
            if binding is not None:
                out.extend(
                    deny_chain(m, binding.path) for m in binding.unpolicied(self.snapshot.policies)
                )
        return out

    def unmatched_policies(self) -> list[str]:
        """Policy routes that name no route of the app."""
        bindings = [b for _, b in walk_routes(self.app.router.routes) if b is not None]
        return [e.key for e in unmatched_entries(self.snapshot.policies, bindings)]


def no_policy_finding(route: str) -> Finding:
    """The finding for an app route (METHOD + template) that no policy governs."""
    return Finding(
        "no-policy",
        f"app route {route} has no policy; it is denied with 403 (add a policy or `public: true`)",
        Location("<app>"),
        (),
    )


def unmatched_entries(policies: PolicySet, bindings: Iterable[Binding]) -> list[RouteEntry]:
    """Policy routes that name no route among `bindings`."""
    served = {(m, normalize_path(b.path)) for b in bindings for m in b.methods}
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
        await engine_start(engine)
        try:
            async with original(inner) as state:
                yield state
        finally:
            await engine_stop(engine)

    app.router.lifespan_context = lifespan


async def engine_start(engine: Engine) -> None:
    """Start every service that has a `start` coroutine, then settle the heap."""
    for service in engine.services.values():
        start = getattr(service, "start", None)
        if start is not None:
            await start()
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
    """Stop every service that has a `stop` coroutine, in reverse order."""
    for service in reversed(list(engine.services.values())):
        stop = getattr(service, "stop", None)
        if stop is not None:
            await stop()


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
    engine = Engine(
        app,
        policy_paths,
        config,
        strict=config.strict if strict is None else strict,
        services=services or default_services,
    )
    observe(app, engine, health=health, metrics=metrics)  # sanitized logs, health routes
    engine._gate_router(app.router, "")
    engine.gate_all(app.router.routes)
    for key in engine.unmatched_policies():
        log.warning("policyroute: policy %s matches no route of the app", key)
    app.add_exception_handler(Denial, _denial_handler)
    _wrap_lifespan(app, engine)
    from . import openapi, reloader

    openapi.install(app, engine)  # the policy in /openapi.json, updated on reload
    reloader.attach(engine)  # SIGHUP reloads under a server
    app.state.policyroute = engine
    return engine
