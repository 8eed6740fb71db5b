"""Bind compiled chains to a FastAPI (Starlette) app's routes; the engine that owns them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
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
from .loader import PolicySet, load_policies
from .policy import METHODS, normalize_path
from .services import default_services

log = logging.getLogger("policyroute")

ServiceFactory = Callable[["Engine"], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Binding:
    """One app route as the policy sees it: a path template and its methods."""

    path: str
    methods: tuple[str, ...]
    websocket: bool = False


def _binding_of(route: BaseRoute) -> Binding | None:
    if isinstance(route, Route):
        methods = tuple(sorted(route.methods)) if route.methods else METHODS
        return Binding(route.path, methods)
    if isinstance(route, WebSocketRoute):
        return Binding(route.path, ("GET",), websocket=True)
    if isinstance(route, Mount):
        return Binding(route.path.rstrip("/") + "/{path:path}", METHODS)
    return None


class Gate:
    """Stands in for a route's ASGI app and runs the current chain for the method first."""

    __slots__ = ("app", "binding", "engine", "gate_id")

    def __init__(self, engine: Engine, gate_id: int, binding: Binding, app: ASGIApp) -> None:
        self.engine = engine
        self.gate_id = gate_id
        self.binding = binding
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = "GET" if scope["type"] == "websocket" else scope["method"]
        table = self.engine.snapshot.tables[self.gate_id]
        bound = table.get(method)
        if bound is None:
            bound = table["*"]
        await bound(scope, receive, send)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one request reads: swapped whole, so a request never sees a mix."""

    policies: PolicySet
    chains: Mapping[tuple[str, str], Chain]
    tables: Mapping[int, Mapping[str, BoundChain]]
    unbound: tuple[str, ...]


class GatedRoutes(list[BaseRoute]):
    """The app's route list; a route added after `install` is gated as it is added."""

    engine: Engine

    def append(self, route: BaseRoute) -> None:
        """Add a route and gate it."""
        super().append(route)
        self.engine.gate(route)

    def insert(self, index: SupportsIndex, route: BaseRoute) -> None:
        """Insert a route and gate it."""
        super().insert(index, route)
        self.engine.gate(route)

    def extend(self, routes: Iterable[BaseRoute]) -> None:
        """Add several routes and gate each."""
        for route in routes:
            self.append(route)


class Engine:
    """Owns the loaded policies, the compiled chains and the gates of one app."""

    def __init__(self, app: FastAPI, paths: list[str], config: Settings, *, strict: bool,
                 services: ServiceFactory | None = None) -> None:
        self.app = app
        self.paths = paths
        self.config = config
        self.strict = strict
        self._service_factory = services
        self.services: Mapping[str, Any] = {}
        self.gates: list[Gate] = []
        self.last_reload_error: ConfigError | None = None
        policies = load_policies(*paths)
        self.services = services(self) if services else {}
        self.snapshot = self._build(policies, gates=())

    # -- building -----------------------------------------------------------------------
    def env(self, policies: PolicySet) -> Env:
        """The compile environment for a policy set."""
        return Env(policies.settings, self.config, self.services)

    def _build(self, policies: PolicySet, gates: Iterable[Gate]) -> Snapshot:
        chains = compile_all(policies, self.env(policies))
        tables: dict[int, Mapping[str, BoundChain]] = {}
        unbound: list[str] = []
        for gate in gates:
            tables[gate.gate_id] = self._table(policies, chains, gate, unbound)
        return Snapshot(policies, chains, tables, tuple(unbound))

    def _table(self, policies: PolicySet, chains: Mapping[tuple[str, str], Chain], gate: Gate,
               unbound: list[str]) -> dict[str, BoundChain]:
        table: dict[str, BoundChain] = {}
        for method in gate.binding.methods:
            entry = policies.get(method, gate.binding.path)
            if entry is None:
                unbound.append(f"{method} {gate.binding.path}")
                chain = deny_chain(method, gate.binding.path)
            else:
                chain = chains[entry.match_key]
            table[method] = chain.bind(gate.app)
        table["*"] = deny_chain("*", gate.binding.path).bind(gate.app)
        return table

    def gate(self, route: BaseRoute) -> None:
        """Put a gate in front of one route (idempotent)."""
        binding = _binding_of(route)
        if binding is None:
            log.warning("policyroute: cannot gate route %r; it is left as is", route)
            return
        current = getattr(route, "app", None)
        if isinstance(current, Gate):
            return
        gate = Gate(self, len(self.gates), binding, current)  # type: ignore[arg-type]
        self.gates.append(gate)
        snap = self.snapshot
        unbound = list(snap.unbound)
        tables = dict(snap.tables)
        tables[gate.gate_id] = self._table(snap.policies, snap.chains, gate, unbound)
        self.snapshot = Snapshot(snap.policies, snap.chains, tables, tuple(unbound))
        route.app = gate  # type: ignore[attr-defined]
        if self.strict and len(unbound) > len(snap.unbound):
            raise ConfigError([_no_policy_finding(r) for r in unbound[len(snap.unbound):]])

    def reload(self) -> ConfigError | None:
        """Load, compile and swap all chains at once; keep the old ones on any error."""
        try:
            policies = load_policies(*self.paths)
            snapshot = self._build(policies, self.gates)
        except ConfigError as exc:
            self.last_reload_error = exc
            log.error("policyroute: reload refused, keeping the last good policy:\n%s", exc)
            return exc
        self.snapshot = snapshot
        self.last_reload_error = None
        return None

    # -- introspection ------------------------------------------------------------------
    def chains(self) -> list[Chain]:
        """Every compiled chain, in policy order, then the deny chains of unbound routes."""
        out = list(self.snapshot.chains.values())
        bound = {c.route for c in out}
        for gate in self.gates:
            for method in gate.binding.methods:
                if self.snapshot.policies.get(method, gate.binding.path) is None:
                    chain = deny_chain(method, gate.binding.path)
                    if chain.route not in bound:
                        out.append(chain)
        return out

    def unmatched_policies(self) -> list[str]:
        """Policy routes that name no route of the app."""
        served = {(m, normalize_path(g.binding.path)) for g in self.gates for m in g.binding.methods}
        return [e.key for k, e in self.snapshot.policies.routes.items() if k not in served]


def _no_policy_finding(route: str) -> Finding:
    return Finding("no-policy", f"app route {route} has no policy; it is denied (403)",
                   Location("<app>"), ())


async def _denial_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Denial)
    return Response(problem_bytes(exc, request.url.path), status_code=exc.status,
                    headers=exc.headers, media_type=CONTENT_TYPE.decode())


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
    """Start every service that has a `start` coroutine."""
    for service in engine.services.values():
        start = getattr(service, "start", None)
        if start is not None:
            await start()


async def engine_stop(engine: Engine) -> None:
    """Stop every service that has a `stop` coroutine, in reverse order."""
    for service in reversed(list(engine.services.values())):
        stop = getattr(service, "stop", None)
        if stop is not None:
            await stop()


def install(app: FastAPI, *paths: str | Path, strict: bool | None = None,
            settings: Settings | None = None, services: ServiceFactory | None = None) -> Engine:
    """Compile the policies and gate every route of `app`; return the engine.

    Routes no policy names answer 403 (deny by default); with `strict=True` they make
    `install` raise `ConfigError` instead.
    """
    config = settings or Settings()
    policy_paths = [str(p) for p in paths] or config.policy_paths()
    engine = Engine(app, policy_paths, config, strict=config.strict if strict is None else strict,
                    services=services or default_services)
    routes = GatedRoutes(app.router.routes)
    routes.engine = engine
    app.router.routes = routes
    findings: list[Finding] = []
    for route in list(routes):
        try:
            engine.gate(route)
        except ConfigError as exc:
            findings.extend(exc.findings)
    if findings:
        raise ConfigError(findings)
    for key in engine.unmatched_policies():
        log.warning("policyroute: policy %s matches no route of the app", key)
    app.add_exception_handler(Denial, _denial_handler)
    _wrap_lifespan(app, engine)
    app.state.policyroute = engine
    return engine
