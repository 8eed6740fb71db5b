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
  the gate matched is handed to the router's own selection code (the handoff,
  `Resolved.__call__`), so it is not matched twice; a router the gate does not know
  dispatches itself (`Dispatch`). Either runs on a copy of the scope, so a retried handler
  is dispatched afresh;
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
governed from its first request: nothing is patched and no cache can be stale. Which plain
top-level route a path and method match is remembered (`RouteMemo`), checked on every use
against the route objects now in the list up to that route, and only where the gate hands
the request to the route it matched: the route that runs is the one whose chain ran.
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
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from starlette.convertors import CONVERTOR_TYPES
from starlette.routing import BaseRoute, Host, Match, Mount, Route, Router, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import Denial, Problems
from ..language.policy import METHODS
from ._entry import arm
from ._problem import send_problem

log = logging.getLogger("policyroute")

ANY_METHOD: Final[tuple[str, ...]] = METHODS
_STANDARD: Final = frozenset(METHODS)
# FastAPI's included-router entries (0.120+): the router they include and how.
_INCLUDED = ("original_router", "include_context")
_MAX_DEPTH = 64  # mounts within mounts: past this, a mount is served whole (a cycle ends)
# Read once: an enum member looked up on its class costs a dictionary walk per request.
_FULL: Final = Match.FULL
_PARTIAL: Final = Match.PARTIAL
_NOMATCH: Final = Match.NONE

# A router's selection of a matched route (what its `app` does on a full match).
Select = Callable[[Any, Scope, Any, Scope], None]
# One plain mount or host passed on the way down: its router, the route it selects, the
# child scope, and the selection the handoff makes in the router's place.
Hop = tuple[Any, Any, Scope, Select]


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
    """The template prefix of what a mount or a host serves (made once per route and prefix)."""
    key = (id(route), prefix)
    cached = _SUBS.get(key)
    if cached is not None and cached[0] is route:
        return cached[1]
    if isinstance(route, Mount):
        sub = _join(prefix, route.path.rstrip("/"))
    else:
        sub = _host_prefix(route.host, prefix)
    if len(_SUBS) >= 4096:
        _SUBS.clear()  # routes replaced many times over: start again
    _SUBS[key] = (route, sub)
    return sub


_SUBS: dict[tuple[int, str], tuple[Any, str]] = {}


def _served_whole(route: Mount | Host, sub: str, kind: str) -> Endpoint:
    """A mount or host whose app is not a router: one endpoint, any path below it."""
    return Endpoint(_join(sub, "/{path:path}"), ANY_METHOD, kind, route)


_KIND_OF_TYPE: Final[dict[type, str]] = {}


def _classify(route: BaseRoute) -> str:
    """The kind of a route entry; the one decision the gate and `endpoints` share."""
    kind = _KIND_OF_TYPE.get(type(route))
    if kind is None:
        kind = _KIND_OF_TYPE[type(route)] = _kind_of(route)
        if kind == "http" or kind == "websocket":
            _LEAF_TYPES.add(type(route))
    return kind


# The route types `_first` matches inline: one set lookup per route a request passes.
_LEAF_TYPES: Final[set[type]] = set()


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


# Made on every request: a dataclass for its comparison and repr, with an `__init__` of its
# own, which the compiled build runs natively (a generated one would be interpreted).
@dataclass(slots=True, init=False)
class Resolved:
    """What the router will dispatch a request to, and the top route it dispatches through."""

    match: Match
    endpoint: Endpoint | None
    top: Any  # the entry of the top router's list that matched, and its child scope
    child: Scope | None
    # A partial match inside a mount or host: the router has committed to the mount, so no
    # later route is tried (the mounted router answers 405).
    final: bool
    # Below `top`, the selections the routers of plain mounts and hosts will make, innermost
    # first: (router, route, child scope). The handoff makes them itself, so no router inside
    # a mount matches its routes again; the chain stops at the first mount it cannot skip.
    hops: list[Hop] | None
    # Through FastAPI included routers: the selections their `_handle_selected` would make
    # after matching again, made by the handoff from what the gate matched (see `Included`).
    included: Included | None
    # Set by the gate once it let the request through: the top router and its selection.
    router: Any
    select: Select | None

    def __init__(
        self,
        match: Match,
        endpoint: Endpoint | None = None,
        top: Any = None,
        child: Scope | None = None,
        final: bool = False,
        hops: list[Hop] | None = None,
        included: Included | None = None,
    ) -> None:
        self.match = match
        self.endpoint = endpoint
        self.top = top
        self.child = child
        self.final = final
        self.hops = hops
        self.included = included
        self.router = None
        self.select = None

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The rest of the routers' dispatch (the handoff): select as they would, then handle.

        The resolution is the handoff itself: one object per request, not two.

        On a fresh scope each time (a retried handler is dispatched afresh); through plain
        mounts and hosts each inner router's selection too, and through FastAPI inclusions
        what each level's `_handle_selected` does after its match.
        """
        fresh = _fresh(scope)
        select = self.select
        assert select is not None and self.child is not None  # set by the gate
        select(self.router, fresh, self.top, self.child)
        route = self.top
        if self.hops:
            for router, route, child, inner_select in reversed(self.hops):
                inner_select(router, fresh, route, child)
        included = self.included
        if included is not None and included.levels[0] is route:
            fastapi = _fastapi_included()
            assert fastapi is not None  # an `Included` is only made where it is known
            return fastapi.enter(fresh, included)(fresh, receive, send)
        # The route's own coroutine, handed back: no frame of the handoff's stays on the
        # request's stack (the caller awaits it).
        return route.handle(fresh, receive, send)  # type: ignore[no-any-return]




@dataclass(slots=True)
class Included:
    """A route reached through FastAPI included routers, as the gate matched it.

    `levels` are the inclusions passed, outermost first; `route`, `child` and `context` are
    what the innermost one's `_match` returns. The handoff replays the few lines each level's
    `_handle_selected` runs after its match, so no level matches its candidates again (FastAPI
    matches an inclusion once per level above it, and once more in each level's `handle`).
    """

    levels: list[Any]
    route: Any
    child: Scope
    context: Any


_NONE: Final = Resolved(Match.NONE)


def resolve(router: Any, scope: Scope, prefix: str = "", depth: int = 0) -> Resolved:
    """Resolve a request the way `router` will: its routes' own `matches`, in order."""
    return _after_routes(router, scope, _first(router.routes, scope, prefix, depth), prefix)


def _after_routes(router: Any, scope: Scope, found: Resolved, prefix: str) -> Resolved:
    """When no route matched fully: the frontend routes, then a default that is not stock."""
    if found.match is _FULL:
        return found
    if found.match is _NOMATCH:
        low = _low_priority(router, scope, prefix)
        if low.match is not _NOMATCH:
            return low
        if not _default_is_stock(router):
            return Resolved(
                _FULL, Endpoint(_join(prefix, "/{path:path}"), ANY_METHOD, "default", router)
            )
    return found


def _first(routes: Sequence[BaseRoute], scope: Scope, prefix: str, depth: int) -> Resolved:
    partial: Resolved | None = None
    leaves = _LEAF_TYPES
    for route in routes:
        if type(route) in leaves or _classify(route) in ("http", "websocket"):
            # Inline: this branch runs once for every route of the list a request passes.
            match, child = route.matches(scope)
            if match is _NOMATCH:
                continue
            endpoint = _endpoint_of(route, prefix, _KIND_OF_TYPE[type(route)])
            if match is _FULL:
                return Resolved(match, endpoint, route, child)
            found = Resolved(match, endpoint)
        else:
            kind = _classify(route)
            if kind == "included":
                found = _included(route, scope, prefix, depth)
                child = {}
            elif kind in ("mount", "host"):
                found, child = _nested(route, scope, prefix, kind, depth)  # type: ignore[arg-type]
            else:
                found = _unknown(route, scope, prefix)
                child = {}
            if found.match is _FULL:
                found.top, found.child = route, child
                return found
        if found.match is _PARTIAL:
            if found.final:
                return found
            if partial is None:
                partial = found
    return partial or _NONE


_ENDPOINTS: Final[dict[tuple[int, str], tuple[Any, Endpoint]]] = {}
_MAX_ENDPOINTS: Final = 4096


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
    if match is _NOMATCH:
        return _NONE, child
    return _inside(route, kind, _sub(route, prefix), match, {**scope, **child}, depth), child


def _inside(
    route: Mount | Host, kind: str, sub: str, match: Match, scope: Scope, depth: int
) -> Resolved:
    """What a matched mount or host serves, resolved in its own router if it has one."""
    inner, select = _plan(route)
    if inner is None or depth > _MAX_DEPTH:
        return Resolved(match, _served_whole(route, sub, kind))
    found = resolve(inner, scope, sub, depth + 1)
    if found.match is _NOMATCH:
        # The router is committed to the mount: the inner router answers (404 or a slash
        # redirect) and no later route is tried. Same here.
        return Resolved(_FULL, None)
    found.final = True
    if found.match is _FULL:
        if found.top is not None and found.child is not None and select is not None:
            if found.hops is None:
                found.hops = []
            found.hops.append((inner, found.top, found.child, select))
        else:
            found.hops = None  # the handoff stops at this mount: it dispatches itself
    return found


def _plan(route: Mount | Host) -> tuple[Any | None, Select | None]:
    """The router a mount or host routes to (None: served whole), and how to select in it
    in its place (None: the mount dispatches itself); remembered per route while its app
    and the router's middleware stack stay the same objects."""
    app, outer = _mount_app(route), route.app
    cached = _PLANS.get(id(route))
    if cached is not None and cached[0] is route and cached[1] is app and cached[2] is outer:
        inner = cached[3]
        if inner is None or getattr(inner, "middleware_stack", None) is cached[4]:
            return inner, cached[5]
    inner = _router_of(app)
    select = _skippable(route, inner) if inner is not None else None
    if len(_PLANS) >= _MAX_ENDPOINTS:
        _PLANS.clear()  # routes replaced many times over: start again
    stack = getattr(inner, "middleware_stack", None)
    _PLANS[id(route)] = (route, app, outer, inner, stack, select)
    return inner, select


_PLANS: dict[int, tuple[Any, Any, Any, Any, Any, Select | None]] = {}


def _skippable(route: Mount | Host, inner: Any) -> Select | None:
    """How to select in `inner` in its place, when handing over may skip `route.handle` and
    `inner`'s dispatch (both stock); None when it may not."""
    stock = _STOCK_HANDLE.get(type(route))
    if stock is None:
        base = Mount.handle if isinstance(route, Mount) else Host.handle
        stock = _STOCK_HANDLE[type(route)] = type(route).handle is base
    if not stock or route.app is not inner:
        return None
    return _select_of(inner)


_STOCK_HANDLE: dict[type, bool] = {}


def _included(route: Any, scope: Scope, prefix: str, depth: int) -> Resolved:
    """A FastAPI included router: its own matcher picks the route, its context the prefix."""
    fastapi = _fastapi_included()
    if fastapi is not None and fastapi.walkable(route):
        return _candidates(fastapi, route, scope, prefix, depth)
    matcher = getattr(route, "_match", None)
    if matcher is None:
        return _unknown(route, scope, prefix)
    match, child, picked, context = matcher(scope)
    if match is _NOMATCH or picked is None:
        return _NONE
    if _classify(picked) == "included":
        return _included(picked, scope, prefix, depth + 1)
    return _picked(route, scope, prefix, depth, match, child, picked, context)


def _candidates(
    fastapi: _FastAPIInclusion, inc: Any, scope: Scope, prefix: str, depth: int
) -> Resolved:
    """`inc._match`, walked here: a nested inclusion is entered once, not matched whole first.

    The same candidates in the same order with the same first-full-else-first-partial rule;
    an API route is matched with its inclusion's context in the scope, as FastAPI does.
    """
    partial: Resolved | None = None
    for candidate in inc.effective_candidates():
        if type(candidate) is fastapi.included:
            found = _included(candidate, scope, prefix, depth + 1)
            if found.match is _FULL:
                if found.included is not None:
                    found.included.levels.insert(0, inc)
                return found
        else:
            original = candidate.original_route
            if isinstance(original, fastapi.api_route):
                match, child = fastapi.match_api_route(scope, candidate, original)
                picked = original
            else:
                match, child = candidate.matches(scope)
                picked = candidate.starlette_route or original
            if match is _NOMATCH:
                continue
            found = _picked(inc, scope, prefix, depth, match, child, picked, candidate)
            if match is _FULL:
                if found.endpoint is not None and found.endpoint.kind in ("http", "websocket"):
                    found.included = Included([inc], picked, child, candidate)
                return found
        if found.match is _PARTIAL and partial is None:
            partial = found
    return partial or _NONE


def _picked(
    route: Any,
    scope: Scope,
    prefix: str,
    depth: int,
    match: Match,
    child: Scope,
    picked: Any,
    context: Any,
) -> Resolved:
    """What an inclusion's pick serves: an endpoint, or a mount or host resolved further."""
    sub = _join(prefix, str(route.include_context.prefix or ""))
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
        found = _nested(effective, scope, prefix, okind, depth + 1)[0]
    elif okind == "mount":
        # FastAPI matched its prefixed copy of the mount; `child` is that copy's child scope.
        found = _inside(original, okind, _sub(original, sub), match, {**scope, **child}, depth)
    else:
        return _unknown(original, scope, prefix)
    # The inclusion's own handle runs (its form and body limits), so no selection below it
    # is made in its place.
    found.hops = None
    return found


class _FastAPIInclusion:
    """FastAPI's included-router internals the gate replays (0.120+), checked once."""

    def __init__(self, routing: Any, route_selected: Callable[..., None]) -> None:
        self.included = routing._IncludedRouter
        self.api_route = routing.APIRoute
        self.api_router = routing.APIRouter
        self.fastapi_scope = routing._get_fastapi_scope
        self.restore = routing._restore_fastapi_scope_key
        self.missing = routing._SCOPE_MISSING
        self.effective_key = routing._FASTAPI_EFFECTIVE_ROUTE_CONTEXT_KEY
        self.included_key = routing._FASTAPI_INCLUDED_ROUTER_KEY
        self.form_limits = routing._apply_router_form_limits
        self.update = routing._update_scope
        self.body_limit = routing.wrap_app_with_body_limit
        self.route_selected = route_selected

    def walkable(self, inc: Any) -> bool:
        """Whether `inc` and the router it includes dispatch the stock way (no overrides)."""
        router: Any = type(getattr(inc, "original_router", None))
        return (
            type(inc) is self.included
            and router.handle is self.api_router.handle
            and router.matches is self.api_router.matches
        )

    def match_api_route(self, scope: Scope, context: Any, route: Any) -> tuple[Match, Scope]:
        """An API route matched under its inclusion's context, as `_IncludedRouter._match`."""
        fastapi_scope = self.fastapi_scope(scope)
        previous = fastapi_scope.get(self.effective_key, self.missing)
        fastapi_scope[self.effective_key] = context
        try:
            match, child = route.matches(scope)
        finally:
            self.restore(scope, self.effective_key, previous)
        return match, child

    def enter(self, scope: Scope, included: Included) -> ASGIApp:
        """Each level's `handle` and `_handle_selected` after its match; the app to call."""
        for level in included.levels:
            self.form_limits(scope, level.include_context.form_limits)
            self.fastapi_scope(scope)[self.included_key] = level
        self.update(scope, included.child)
        context = included.context
        self.route_selected(
            scope=scope,
            path=getattr(context.starlette_route, "path_format", None) or context.path_format,
            mount=isinstance(included.route, Mount),
        )
        self.fastapi_scope(scope)[self.effective_key] = context
        original = context.original_route
        if isinstance(original, self.api_route):
            scope["route"] = original
            return original.handle  # type: ignore[no-any-return]
        return self.body_limit(  # type: ignore[no-any-return]
            included.route.handle, included.levels[-1].include_context.max_body_size
        )


_INCLUSION: list[_FastAPIInclusion | None] = []


def _fastapi_included() -> _FastAPIInclusion | None:
    """The included-router internals of this FastAPI, or None where they differ (then the
    inclusions match and dispatch themselves, as before)."""
    if _INCLUSION:
        return _INCLUSION[0]
    found: _FastAPIInclusion | None = None
    try:
        from fastapi import routing
        from fastapi.telemetry._api import _route_selected

        found = _FastAPIInclusion(routing, _route_selected)
        stock = found.included
        if not all(
            hasattr(stock, name) for name in ("effective_candidates", "_handle_selected", "_match")
        ):
            found = None
    except (ImportError, AttributeError):
        found = None
    _INCLUSION.append(found)
    return found


def _low_priority(router: Any, scope: Scope, prefix: str) -> Resolved:
    """FastAPI's frontend routes, tried after every other route."""
    matcher = getattr(router, "_match_low_priority", None)
    if matcher is None or (not _frontend_groups(router) and not _has_included(router)):
        return _NONE
    if scope["type"] != "http":
        return _NONE
    match, _, picked, context = matcher(scope)
    if match is _NOMATCH or picked is None:
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
    if match is _NOMATCH:
        return _NONE
    path = str(getattr(route, "path", "") or "")
    return Resolved(
        _FULL,
        Endpoint(_join(prefix, path) if path else prefix or "/", ANY_METHOD, "unknown", route),
    )


# --- the gate ------------------------------------------------------------------------------


# The chain of a resolved endpoint for a method, run as chain(scope, receive, send, app,
# marks_entry) around the router's dispatch `app`. Chosen, then awaited by the gate itself:
# no coroutine frame between the gate and the chain.
Guarded = Callable[[Scope, Receive, Send, ASGIApp, bool], Awaitable[None]]
Decide = Callable[[str, Endpoint], Guarded]


class Decider:
    """`Decide` for a holder of compiled chains (the engine): the chain of a resolved endpoint
    for a method, from the holder's snapshot as it is now (a reload swaps it whole).

    The snapshot offers `bound` (METHOD, template -> chain), `chain_for` and `deny`.
    """

    __slots__ = ("holder",)

    def __init__(self, holder: Any) -> None:
        self.holder = holder

    def __call__(self, method: str, endpoint: Endpoint) -> Guarded:
        snapshot = self.holder.snapshot
        if endpoint.kind != "unknown":  # `endpoint.known`
            # `chain_for`'s common case inline: one lookup for a template seen before.
            found: Guarded | None = snapshot.bound.get((method, endpoint.path))
            return found if found is not None else snapshot.chain_for(method, endpoint.path)
        return snapshot.deny(method, endpoint.path)  # type: ignore[no-any-return]


def _not_allowed(methods: Sequence[str]) -> Denial:
    allowed = ", ".join(m for m in METHODS if m in methods)
    return Denial(
        Problems.METHOD_NOT_ALLOWED,
        f"this endpoint answers {allowed}",
        headers={"Allow": allowed},
    )


def _copy(scope: Scope, inner: str) -> Scope:
    """A copy of `scope` and of its dict under `inner` (which code downstream may change)."""
    copied = dict(scope)
    nested = copied.get(inner)
    if isinstance(nested, dict):
        copied[inner] = dict(nested)
    return copied


def _fresh(scope: Scope) -> Scope:
    """A copy of the scope as the gate saw it, so a retried handler is dispatched afresh."""
    return _copy(scope, "fastapi")


class Dispatch:
    """The router's own dispatch, run on a fresh copy of the request's scope each time."""

    __slots__ = ("inner",)

    def __init__(self, inner: ASGIApp) -> None:
        self.inner = inner

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Dispatch once (a retry dispatches again from the scope as the gate saw it)."""
        return self.inner(_fresh(scope), receive, send)


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


# --- resolutions remembered -------------------------------------------------------------


def _stock_matchers() -> frozenset[Any]:
    """The `matches` functions whose answer depends on the request's type, path, root path
    and method alone (and on an empty `path_params`, and no FastAPI route context)."""
    found: set[Any] = {Route.matches, WebSocketRoute.matches}
    try:
        from fastapi.routing import APIRoute, APIWebSocketRoute
    except ImportError:  # pragma: no cover - fastapi is a dependency
        return frozenset(found)
    found.update((APIRoute.matches, APIWebSocketRoute.matches))
    return frozenset(found)


def _fastapi_context_key() -> tuple[str, str] | None:
    """Where FastAPI's `APIRoute.matches` reads an included route's context from the scope."""
    try:
        from fastapi import routing
    except ImportError:  # pragma: no cover - fastapi is a dependency
        return None
    outer = getattr(routing, "_FASTAPI_SCOPE_KEY", None)
    inner = getattr(routing, "_FASTAPI_EFFECTIVE_ROUTE_CONTEXT_KEY", None)
    return (outer, inner) if isinstance(outer, str) and isinstance(inner, str) else None


_STOCK_MATCHERS: Final = _stock_matchers()
_CONTEXT_KEY: Final = _fastapi_context_key()
_STOCK_CONVERTORS: Final = frozenset(type(c) for c in CONVERTOR_TYPES.values())
MEMO_ROUTES = 4096  # resolutions a gate remembers; past this it starts again
MEMO_PATH: Final = 512  # a longer path is matched every time


def _plain(route: Any) -> bool:
    """Whether a route's match is a function of the request's type, path and method alone:
    a stock matcher with Starlette's own path convertors."""
    if getattr(type(route), "matches", None) not in _STOCK_MATCHERS:
        return False
    convertors = getattr(route, "param_convertors", None)
    return isinstance(convertors, dict) and all(
        type(c) in _STOCK_CONVERTORS for c in convertors.values()
    )


def _own(child: Scope) -> Scope:
    """A copy of a child scope and of its `path_params`, which a handler may change."""
    return _copy(child, "path_params")


class _Remembered:
    """A full match of a top-level route: the routes before it (none matched fully), the
    route, its endpoint and its child scope."""

    __slots__ = ("before", "child", "endpoint", "route")

    def __init__(self, before: tuple[Any, ...], route: Any, endpoint: Endpoint, child: Scope):
        self.before = before
        self.route = route
        self.endpoint = endpoint
        self.child = child


class RouteMemo:
    """Which route of a router's list a request matches, remembered by type, method, path
    and root path.

    Starlette matches a request by asking each route in turn: a regular expression and a
    few dictionaries for every route before the one that matches, in interpreted code. For
    routes whose answer depends on nothing else (`_plain`), the answer is the same for the
    next request with the same four values, as long as the list still holds the same route
    objects up to the one that matched: checked by identity on every use, so a route
    inserted, removed or replaced before it is seen at once. Only full matches are kept,
    only when the gate hands the request to that very route (its selection), so the route
    that runs is always the one whose chain ran. Each use gets its own copy of the child
    scope (`path_params` included): a handler that changes it changes nothing remembered.
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[tuple[Any, Any, Any, Any], _Remembered] = {}

    @staticmethod
    def _key(scope: Scope) -> tuple[Any, Any, Any, Any] | None:
        if "path_params" in scope:
            return None
        context = _CONTEXT_KEY
        if context is not None:
            outer = scope.get(context[0])
            if outer is not None and (type(outer) is not dict or context[1] in outer):
                return None
        path = scope["path"]
        if type(path) is not str or len(path) > MEMO_PATH:
            return None
        return (scope["type"], scope.get("method"), path, scope.get("root_path", ""))

    def get(self, routes: Sequence[Any], scope: Scope) -> Resolved | None:
        """The remembered full match for this request, if the routes before it are as then."""
        key = self._key(scope)
        if key is None:
            return None
        found = self.entries.get(key)
        if found is None:
            return None
        before = found.before
        count = len(before)
        if len(routes) <= count or routes[count] is not found.route:
            return None
        for i in range(count):
            if routes[i] is not before[i]:
                return None
        return Resolved(_FULL, found.endpoint, found.route, _own(found.child))

    def put(self, routes: Sequence[Any], scope: Scope, found: Resolved) -> None:
        """Remember a full match of a plain top-level route after plain routes only."""
        route = found.top
        if found.endpoint is None or found.child is None or found.hops or found.included:
            return
        key = self._key(scope)
        if key is None:
            return
        before: list[Any] = []
        for candidate in routes:
            if not _plain(candidate):
                return
            if candidate is route:
                break
            before.append(candidate)
        else:
            return
        entries = self.entries
        if len(entries) >= MEMO_ROUTES:
            entries.clear()  # many paths (path parameters): start again rather than grow
        entries[key] = _Remembered(tuple(before), route, found.endpoint, _own(found.child))


class RouterGate:
    """Sits at the top of the app's router: resolves each request, runs its chain first."""

    __slots__ = ("decide", "dispatch", "inner", "memo", "router", "select", "warned")

    def __init__(self, router: Any, inner: ASGIApp, decide: Decide) -> None:
        self.router = router
        self.inner = inner
        self.dispatch = Dispatch(inner)
        self.select = _selector(router, inner)
        self.decide = decide
        self.warned: set[type] = set()
        # Only where the gate hands requests to the route it matched (`select`).
        self.memo: RouteMemo | None = RouteMemo() if self.select is not None else None

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Resolve, refuse what no policy can allow, run the chain around the dispatch.

        Not a coroutine: it hands back what its caller awaits (the chain's, the router's),
        so no frame of the gate's stays on the request's stack.
        """
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            return self.inner(scope, receive, send)  # lifespan
        router = self.router
        routes = router.routes
        memo = self.memo
        remembered = memo.get(routes, scope) if memo is not None else None
        if remembered is not None:
            found = remembered
        else:
            found = _first(routes, scope, "", 0)  # `resolve`, its common case inline
            if found.match is not _FULL:
                found = _after_routes(router, scope, found, "")
            elif memo is not None:
                memo.put(routes, scope, found)
        endpoint = found.endpoint
        if endpoint is None:
            return self.inner(scope, receive, send)  # 404 or a slash redirect: no endpoint
        method = scope["method"] if kind == "http" else "GET"
        if kind == "http" and method not in _STANDARD:
            return self._refuse(scope, send, _not_allowed(endpoint.methods))
        if found.match is _PARTIAL:
            if kind == "http":
                return self._refuse(scope, send, _not_allowed(endpoint.methods))
            return send({"type": "websocket.close", "code": 1008, "reason": "no-policy"})
        if endpoint.kind == "unknown":
            self._warn(endpoint)  # `decide` denies it
        select = self.select
        if select is None or found.top is None or found.child is None:
            app: ASGIApp = self.dispatch
        else:
            found.router, found.select = self.router, select
            app = found
        return self.decide(method, endpoint)(scope, receive, send, app, endpoint.marks_entry)

    def _refuse(self, scope: Scope, send: Send, denial: Denial) -> Awaitable[None]:
        head = scope["method"] == "HEAD"
        return send_problem(send, denial, instance=scope.get("path"), head=head)

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
