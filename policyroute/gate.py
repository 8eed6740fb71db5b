"""The gate: every request that reaches an endpoint runs that endpoint's chain first.

Why one gate in front of the router, not a gate on each route
-------------------------------------------------------------
An earlier design replaced `handle` on each route object it found at `install`. That
governs only the objects it saw, in the ways it knew: FastAPI builds new route objects for
included routers at request time; a `Mount` answers every method, where a `Route` answers
405 for those it does not declare; a `Host` has no path of its own; a route list can be
changed after `install` in more ways than a list subclass can observe. Each hole needed its
own patch, and the next FastAPI release could open another.

So the gate sits where every request must pass: at the top of the app's router
(`Router.middleware_stack`, which `Router.__call__` always runs). For each HTTP and
websocket request it resolves the endpoint the way the router is about to: it walks the
live route lists in order and asks each route's own `matches` (FastAPI's included routers
answer through their own matcher), descending into mounts and hosts whose app is a router.
Then:

- a known endpoint matched: the chain of METHOD + template runs, then the top-level route
  the gate matched is handed to the router's own selection code (`Handoff`), so it is not
  matched twice; a router the gate does not know dispatches itself (`Dispatch`). Either runs
  on a copy of the scope, so a retried handler is dispatched afresh;
- a route matched the path but not the method: 405 from the gate itself, nothing runs
  (inside a mount or host too: the router has committed to the mount and tries no later
  route);
- a method outside the seven the policy language names (extension methods such as
  `PROPFIND`, invented ones, lowercase `get`): 405 from the gate, whatever the route, since no
  policy can allow it;
- a route type the gate does not know matched: 403, never passed through;
- nothing matched: the router answers 404 or its slash redirect; no endpoint runs. A router
  whose `default` is not the stock 404 is an endpoint of its own (`/{path:path}` under it).

Resolution reads the live route lists on every request, so a route added after `install`
by any means (append, slice assignment, `include_router`, `mount`, a replaced list) is
governed from its first request: nothing is patched and no cache can be stale.
`endpoints()` walks the same tree with the same classification (`_classify`) for lint,
explain and strict mode, so what lint lists is what the gate governs.

Limits, written down: whether a route matches is always asked of the route, but the template
and methods of a route object are read once (a route whose `path` is reassigned after its
first request keeps its first template: replace the route instead); an app
reached through an object that is neither a router nor a known route (a mounted ASGI app
with routing of its own) is one endpoint, `METHOD /prefix/{path:path}`.

Hosts are named in the policy language in the network-path form of RFC 3986:
`GET //admin.example.com/reports` is the route `/reports` of `app.host("admin.example.com",
...)`, and `GET //{tenant}.example.com/{path:path}` a host whose app is not a router.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.routing import BaseRoute, Host, Match, Mount, Route, Router, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ._entry import arm
from ._problem import send_problem
from .errors import Denial, Problems
from .policy import METHODS

log = logging.getLogger("policyroute")

ANY_METHOD: tuple[str, ...] = METHODS
_STANDARD = frozenset(METHODS)
# FastAPI's included-router entries (0.120+): the router they include and how.
_INCLUDED = ("original_router", "include_context")
_MAX_DEPTH = 64  # mounts within mounts: past this, a mount is served whole (a cycle ends)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint as the policy sees it: METHOD + template, and what serves it."""

    path: str
    methods: tuple[str, ...]
    kind: str = "http"  # http, websocket, mount, host, frontend, default, unknown
    route: Any = field(default=None, compare=False, repr=False)
    # Whether the endpoint function marks its entry (a FastAPI route, which can answer a
    # request it refuses without calling it; see `_entry.py`).
    marks_entry: bool = field(default=False, compare=False, repr=False)

    @property
    def known(self) -> bool:
        """Whether the gate knows what serves this endpoint (unknown types are denied)."""
        return self.kind != "unknown"


# --- the route tree ---------------------------------------------------------------------


def _router_of(app: Any) -> Any | None:
    """The router that routes `app` as it is: a Router, or a Starlette app with no middleware.

    An app whose middleware runs before its router could rewrite the path, so the gate does
    not guess what it routes to: it is one endpoint (`/prefix/{path:path}`).
    """
    if isinstance(app, Router):
        return app
    router = getattr(app, "router", None)
    if isinstance(router, Router) and not getattr(app, "user_middleware", None):
        return router
    return None


def _mount_app(route: Mount | Host) -> Any:
    # Starlette keeps the app before the mount's middleware as `_base_app`.
    return getattr(route, "_base_app", route.app)


def _join(prefix: str, path: str) -> str:
    return (prefix.rstrip("/") + path) if path.startswith("/") else prefix + "/" + path


def _host_prefix(host: str, prefix: str) -> str:
    """`//host` then the path prefix the host is reached under (a mount's, an include's)."""
    return "//" + host + (prefix.rstrip("/") if not prefix.startswith("//") else "")


def _sub(route: Mount | Host, prefix: str) -> str:
    """The template prefix of what a mount or a host serves."""
    if isinstance(route, Mount):
        return _join(prefix, route.path.rstrip("/"))
    return _host_prefix(route.host, prefix)


def _served_whole(route: Mount | Host, sub: str, kind: str) -> Endpoint:
    """A mount or host whose app is not a router: one endpoint, any path below it."""
    return Endpoint(_join(sub, "/{path:path}"), ANY_METHOD, kind, route)


_KIND_OF_TYPE: dict[type, str] = {}


def _classify(route: BaseRoute) -> str:
    """The kind of a route entry; the one decision the gate and `endpoints` share."""
    kind = _KIND_OF_TYPE.get(type(route))
    if kind is None:
        kind = _KIND_OF_TYPE[type(route)] = _kind_of(route)
    return kind


def _kind_of(route: BaseRoute) -> str:
    if all(hasattr(route, a) for a in _INCLUDED):
        return "included"
    if isinstance(route, Route):
        return "http"
    if isinstance(route, WebSocketRoute):
        return "websocket"
    if isinstance(route, Mount):
        return "mount"
    if isinstance(route, Host):
        return "host"
    return "unknown"


def _default_is_stock(router: Any) -> bool:
    default = getattr(router, "default", None)
    return getattr(default, "__func__", None) is Router.not_found


def _frontend_groups(router: Any) -> list[Any]:
    return list(getattr(router, "_low_priority_routes", ()) or ())


def _frontend_template(prefix: str, path: str) -> str:
    return (
        _join(prefix, path.rstrip("/") + "/{path:path}")
        if path != "/"
        else _join(prefix, "/{path:path}")
    )


def endpoints(router: Any, prefix: str = "", depth: int = 0) -> Iterator[Endpoint]:
    """Every endpoint reachable from a router, with its full template, in routing order."""
    yield from _walk(router.routes, prefix, depth)
    for group in _frontend_groups(router):
        yield from _frontend_endpoints(group, prefix)
    if not _default_is_stock(router):
        yield Endpoint(_join(prefix, "/{path:path}"), ANY_METHOD, "default", router)


def _frontend_endpoints(group: Any, prefix: str) -> Iterator[Endpoint]:
    for front in getattr(group, "routes", ()):
        yield Endpoint(_frontend_template(prefix, front.path), ("GET", "HEAD"), "frontend", front)


def _walk(routes: Iterable[BaseRoute], prefix: str, depth: int) -> Iterator[Endpoint]:
    for route in list(routes):
        kind = _classify(route)
        if kind == "included":
            context = route.include_context  # type: ignore[attr-defined]
            inner = route.original_router  # type: ignore[attr-defined]
            sub = _join(prefix, str(getattr(context, "prefix", ""))) if context.prefix else prefix
            yield from _walk(inner.routes, sub, depth + 1)
            for group in _frontend_groups(inner):
                yield from _frontend_endpoints(group, sub)
        elif kind == "http" or kind == "websocket":
            yield _endpoint_of(route, prefix, kind)
        elif kind in ("mount", "host"):
            assert isinstance(route, Mount | Host)
            sub = _sub(route, prefix)
            inner = _router_of(_mount_app(route))
            if inner is None or depth > _MAX_DEPTH:
                yield _served_whole(route, sub, kind)
            else:
                yield from endpoints(inner, sub, depth + 1)
        else:
            path = str(getattr(route, "path", "") or "")
            yield Endpoint(_join(prefix, path) if path else prefix or "/", ANY_METHOD, kind, route)


# --- resolving one request ----------------------------------------------------------------


@dataclass(slots=True)
class Resolved:
    """What the router will dispatch a request to, and the top route it dispatches through."""

    match: Match
    endpoint: Endpoint | None = None
    top: Any = None  # the entry of the top router's list that matched, and its child scope
    child: Scope | None = None
    # A partial match inside a mount or host: the router has committed to the mount, so no
    # later route is tried (the mounted router answers 405).
    final: bool = False
    # Below `top`, the selections the routers of plain mounts and hosts will make, innermost
    # first: (router, route, child scope). `Handoff` makes them itself, so no router inside
    # a mount matches its routes again; the chain stops at the first mount it cannot skip.
    hops: list[tuple[Any, Any, Scope]] | None = None


_NONE = Resolved(Match.NONE)


def resolve(router: Any, scope: Scope, prefix: str = "", depth: int = 0) -> Resolved:
    """Resolve a request the way `router` will: its routes' own `matches`, in order."""
    found = _first(router.routes, scope, prefix, depth)
    if found.match is Match.FULL:
        return found
    if found.match is Match.NONE:
        low = _low_priority(router, scope, prefix)
        if low.match is not Match.NONE:
            return low
        if not _default_is_stock(router):
            return Resolved(
                Match.FULL, Endpoint(_join(prefix, "/{path:path}"), ANY_METHOD, "default", router)
            )
    return found


def _first(routes: Sequence[BaseRoute], scope: Scope, prefix: str, depth: int) -> Resolved:
    partial: Resolved | None = None
    kinds = _KIND_OF_TYPE
    for route in routes:
        kind = kinds.get(type(route)) or _classify(route)
        if kind == "http" or kind == "websocket":
            # Inline: this branch runs once for every route of the list a request passes.
            match, child = route.matches(scope)
            if match is Match.NONE:
                continue
            found = Resolved(match, _endpoint_of(route, prefix, kind))
        elif kind == "included":
            found = _included(route, scope, prefix, depth)
            child = {}
        elif kind in ("mount", "host"):
            found, child = _nested(route, scope, prefix, kind, depth)  # type: ignore[arg-type]
        else:
            found = _unknown(route, scope, prefix)
            child = {}
        if found.match is Match.FULL:
            found.top, found.child = route, child
            return found
        if found.match is Match.PARTIAL:
            if found.final:
                return found
            if partial is None:
                partial = found
    return partial or _NONE


_ENDPOINTS: dict[tuple[int, str], tuple[Any, Endpoint]] = {}
_MAX_ENDPOINTS = 4096


def _endpoint_of(route: Any, prefix: str, kind: str) -> Endpoint:
    """The endpoint of a leaf route under a prefix, made once (keyed by the route object)."""
    key = (id(route), prefix)
    cached = _ENDPOINTS.get(key)
    if cached is not None and cached[0] is route:
        return cached[1]
    if kind == "websocket":
        methods: tuple[str, ...] = ("GET",)
    else:
        methods = tuple(sorted(route.methods)) if route.methods else ANY_METHOD
    marks = kind == "http" and arm(route)
    endpoint = Endpoint(_join(prefix, route.path), methods, kind, route, marks)
    if len(_ENDPOINTS) >= _MAX_ENDPOINTS:
        _ENDPOINTS.clear()  # routes replaced many times over: start again
    _ENDPOINTS[key] = (route, endpoint)
    return endpoint


def _nested(
    route: Mount | Host, scope: Scope, prefix: str, kind: str, depth: int
) -> tuple[Resolved, Scope]:
    match, child = route.matches(scope)
    if match is Match.NONE:
        return _NONE, child
    return _inside(route, kind, _sub(route, prefix), match, {**scope, **child}, depth), child


def _inside(
    route: Mount | Host, kind: str, sub: str, match: Match, scope: Scope, depth: int
) -> Resolved:
    """What a matched mount or host serves, resolved in its own router if it has one."""
    inner = _router_of(_mount_app(route))
    if inner is None or depth > _MAX_DEPTH:
        return Resolved(match, _served_whole(route, sub, kind))
    found = resolve(inner, scope, sub, depth + 1)
    if found.match is Match.NONE:
        # The router is committed to the mount: the inner router answers (404 or a slash
        # redirect) and no later route is tried. Same here.
        return Resolved(Match.FULL, None)
    found.final = True
    if found.match is Match.FULL:
        if found.top is not None and found.child is not None and _skippable(route, inner):
            if found.hops is None:
                found.hops = []
            found.hops.append((inner, found.top, found.child))
        else:
            found.hops = None  # the handoff stops at this mount: it dispatches itself
    return found


def _skippable(route: Mount | Host, inner: Any) -> bool:
    """Whether handing over may skip `route.handle` and `inner`'s dispatch (both stock)."""
    stock = Mount.handle if isinstance(route, Mount) else Host.handle
    return (
        type(route).handle is stock
        and route.app is inner
        and _select_of(inner) is not None
    )


def _included(route: Any, scope: Scope, prefix: str, depth: int) -> Resolved:
    """A FastAPI included router: its own matcher picks the route, its context the prefix."""
    matcher = getattr(route, "_match", None)
    if matcher is None:
        return _unknown(route, scope, prefix)
    match, child, picked, context = matcher(scope)
    if match is Match.NONE or picked is None:
        return _NONE
    sub = _join(prefix, str(route.include_context.prefix or ""))
    kind = _classify(picked)
    if kind == "included":
        return _included(picked, scope, prefix, depth + 1)
    original = getattr(context, "original_route", picked)
    okind = _classify(original)
    if okind in ("http", "websocket"):
        endpoint = _endpoint_of(original, sub, okind)
        # The handler of an included route is built on the inclusion's own dependant.
        if endpoint.marks_entry and not arm(context if context is not None else picked):
            endpoint = replace(endpoint, marks_entry=False)
        return Resolved(match, endpoint)
    if okind == "host":
        # FastAPI wraps a host of a prefixed router in a router that mounts the prefix.
        effective = getattr(context, "starlette_route", None) or picked
        return _nested(effective, scope, prefix, okind, depth + 1)[0]
    if okind == "mount":
        # FastAPI matched its prefixed copy of the mount; `child` is that copy's child scope.
        return _inside(original, okind, _sub(original, sub), match, {**scope, **child}, depth)
    return _unknown(original, scope, prefix)


def _low_priority(router: Any, scope: Scope, prefix: str) -> Resolved:
    """FastAPI's frontend routes, tried after every other route."""
    matcher = getattr(router, "_match_low_priority", None)
    if matcher is None or (not _frontend_groups(router) and not _has_included(router)):
        return _NONE
    if scope["type"] != "http":
        return _NONE
    match, _, picked, context = matcher(scope)
    if match is Match.NONE or picked is None:
        return _NONE
    front_prefix = str(getattr(context, "frontend_prefix", "") or "")
    inner = getattr(picked, "_match", None)
    template = _join(prefix, _join(front_prefix, "/{path:path}"))
    if inner is not None:
        _, _, front = inner(scope, prefix=front_prefix)
        if front is not None:
            template = _frontend_template(prefix, _join(front_prefix, front.path))
    return Resolved(match, Endpoint(template, ("GET", "HEAD"), "frontend", picked))


def _has_included(router: Any) -> bool:
    return any(_classify(r) == "included" for r in router.routes)


def _unknown(route: Any, scope: Scope, prefix: str) -> Resolved:
    try:
        match, _ = route.matches(scope)
    except Exception:  # a route we do not know failed to match: it does not serve this
        log.exception("policyroute: route %r failed to match; treated as no match", route)
        return _NONE
    if match is Match.NONE:
        return _NONE
    path = str(getattr(route, "path", "") or "")
    return Resolved(
        Match.FULL,
        Endpoint(_join(prefix, path) if path else prefix or "/", ANY_METHOD, "unknown", route),
    )


# --- the gate ------------------------------------------------------------------------------


Decide = Callable[[Scope, Receive, Send, Endpoint, ASGIApp], Any]


def _not_allowed(methods: Sequence[str]) -> Denial:
    allowed = ", ".join(m for m in METHODS if m in methods)
    return Denial(
        Problems.METHOD_NOT_ALLOWED,
        f"this endpoint answers {allowed}",
        headers={"Allow": allowed},
    )


def _fresh(scope: Scope) -> Scope:
    """A copy of the scope as the gate saw it, so a retried handler is dispatched afresh."""
    fresh = dict(scope)
    fastapi = fresh.get("fastapi")
    if isinstance(fastapi, dict):
        fresh["fastapi"] = dict(fastapi)
    return fresh


class Dispatch:
    """The router's own dispatch, run on a fresh copy of the request's scope each time."""

    __slots__ = ("inner",)

    def __init__(self, inner: ASGIApp) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch once (a retry dispatches again from the scope as the gate saw it)."""
        await self.inner(_fresh(scope), receive, send)


def _starlette_select(router: Any, scope: Scope, route: Any, child: Scope) -> None:
    # Starlette's `Router.app` on a full match.
    scope.setdefault("router", router)
    scope["route"] = route
    scope.update(child)


def _fastapi_select() -> Callable[[Any, Scope, Any, Scope], None] | None:
    """FastAPI's `APIRouter.app` on a full match, where this FastAPI routes that way."""
    try:
        from fastapi import routing
        from fastapi.telemetry._api import _route_selected
    except ImportError:
        return None
    update = getattr(routing, "_update_scope", None)
    limits = getattr(routing, "_apply_router_form_limits", None)
    if update is None or limits is None:
        return None

    def select(router: Any, scope: Scope, route: Any, child: Scope) -> None:
        limits(scope, router.form_limits)
        scope.setdefault("router", router)
        update(scope, child)
        _route_selected(
            scope=scope, path=getattr(route, "path_format", None), mount=isinstance(route, Mount)
        )

    return select


def _selector(router: Any, inner: ASGIApp) -> Callable[[Any, Scope, Any, Scope], None] | None:
    """How `router` selects a matched route, when the gate can do it in its place.

    The gate has already matched the route; doing the router's few lines for a full match
    here spares matching every route again. Only for the two router classes whose `app` is
    known, and only when nothing (router middleware, a body limit) sits between the gate and
    `router.app`; otherwise the router dispatches itself.
    """
    if getattr(inner, "__self__", None) is not router or getattr(inner, "__func__", None) is None:
        return None
    app = getattr(type(router), "app", None)
    if app is Router.app:
        return _starlette_select
    try:
        from fastapi.routing import APIRouter
    except ImportError:  # pragma: no cover - fastapi is a dependency
        return None
    if app is APIRouter.app and "app" in APIRouter.__dict__:
        return _fastapi_select()
    return None


Select = Callable[[Any, Scope, Any, Scope], None]
_SELECTS: dict[int, tuple[Any, Any, Select | None]] = {}


def _select_of(router: Any) -> Select | None:
    """`_selector` for a router as it is now, remembered per router and middleware stack."""
    stack = router.middleware_stack
    cached = _SELECTS.get(id(router))
    if cached is not None and cached[0] is router and cached[1] is stack:
        return cached[2]
    select = _selector(router, stack)
    if len(_SELECTS) >= _MAX_ENDPOINTS:
        _SELECTS.clear()
    _SELECTS[id(router)] = (router, stack, select)
    return select


class Handoff:
    """The rest of the router's dispatch for a route the gate matched: select it, handle it.

    Through plain mounts and hosts, each inner router's selection too (`Resolved.hops`),
    down to the route that handles the request.
    """

    __slots__ = ("child", "hops", "route", "router", "select")

    def __init__(
        self,
        router: Any,
        route: Any,
        child: Scope,
        select: Select,
        hops: list[tuple[Any, Any, Scope]] | None = None,
    ) -> None:
        self.router, self.route, self.child, self.select = router, route, child, select
        self.hops = hops

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Select the route as the routers would, on a fresh scope, and let it handle."""
        fresh = _fresh(scope)
        self.select(self.router, fresh, self.route, self.child)
        route = self.route
        if self.hops:
            for router, route, child in reversed(self.hops):
                select = _select_of(router)
                assert select is not None  # checked when resolved
                select(router, fresh, route, child)
        await route.handle(fresh, receive, send)


class RouterGate:
    """Sits at the top of the app's router: resolves each request, runs its chain first."""

    __slots__ = ("decide", "dispatch", "inner", "router", "select", "warned")

    def __init__(self, router: Any, inner: ASGIApp, decide: Decide) -> None:
        self.router = router
        self.inner = inner
        self.dispatch = Dispatch(inner)
        self.select = _selector(router, inner)
        self.decide = decide
        self.warned: set[type] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Resolve, refuse what no policy can allow, run the chain around the dispatch."""
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.inner(scope, receive, send)  # lifespan
            return
        found = resolve(self.router, scope)
        endpoint = found.endpoint
        if endpoint is None:
            await self.inner(scope, receive, send)  # 404 or a slash redirect: no endpoint
            return
        method = scope["method"] if kind == "http" else "GET"
        if kind == "http" and method not in _STANDARD:
            await self._refuse(scope, send, _not_allowed(endpoint.methods))
            return
        if found.match is Match.PARTIAL:
            if kind == "http":
                await self._refuse(scope, send, _not_allowed(endpoint.methods))
            else:
                await send({"type": "websocket.close", "code": 1008, "reason": "no-policy"})
            return
        if not endpoint.known:
            self._warn(endpoint)  # `decide` denies it
        select = self.select
        if select is None or found.top is None or found.child is None:
            app: ASGIApp = self.dispatch
        else:
            app = Handoff(self.router, found.top, found.child, select, found.hops)
        await self.decide(scope, receive, send, endpoint, app)

    async def _refuse(self, scope: Scope, send: Send, denial: Denial) -> None:
        await send_problem(send, denial, instance=scope.get("path"), head=scope["method"] == "HEAD")

    def _warn(self, endpoint: Endpoint) -> None:
        kind = type(endpoint.route)
        if kind not in self.warned:
            self.warned.add(kind)
            log.error(
                "policyroute: a %s route matched %s; it is a route type policyroute does not "
                "know, so every request to it is denied",
                kind.__name__,
                endpoint.path,
            )


def gate_router(router: Any, decide: Decide) -> RouterGate:
    """Put a gate at the top of `router` (idempotent); return it."""
    current = router.middleware_stack
    if isinstance(current, RouterGate):
        current.decide = decide
        return current
    gate = RouterGate(router, current, decide)
    router.middleware_stack = gate
    return gate
