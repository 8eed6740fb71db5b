"""A request as people write it, resolved to the route of the policy that governs it.

`check`, `explain` and `test` take `METHOD PATH` as a caller would send it: the method in
any case, a concrete path (`GET /user/42`, `get /user/42?full=1`), or the template itself
(`GET /user/{user_id}`). The path is matched against each route template of the method
the way Starlette's router matches it (`{name}` one segment, `{name:int}` digits,
`{name:path}` the rest); HEAD falls back to GET as the gate does. Host routes
(`GET //{tenant}.example.com/reports`) take a concrete `//host/path`.

Without the app, the policy does not know the order the router tries routes in, so when
several templates match, the most specific wins: a `{name:path}` parameter last, then
fewer parameters, more literal characters, typed parameters (`{n:int}`) before plain
ones. Two equally specific matches are reported, never guessed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.routing import compile_path

from ..errors import PolicyrouteError
from .loader import PolicySet, RouteEntry
from .policy import METHODS

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z_]+))?\}")


class RouteNotFound(PolicyrouteError):  # noqa: N818 - an answer, not a failure
    """No route of the policy (or more than one, equally specific) governs the request."""


@dataclass(frozen=True, slots=True)
class Resolved:
    """A concrete request and the route that governs it."""

    key: str  # the route key as the policy writes it, e.g. `GET /user/{user_id}`
    method: str  # the request's method, upper case
    path: str  # the concrete path, without host or query
    query: str = ""
    host: str | None = None  # for host routes (`//host/path`)
    params: dict[str, str] = field(default_factory=dict)
    entry: RouteEntry | None = None

    @property
    def target(self) -> str:
        """The request line's target: path and query."""
        return self.path + (f"?{self.query}" if self.query else "")


def split_request(text: str) -> tuple[str, str]:
    """`METHOD TARGET` with the method upper-cased; raise RouteNotFound when malformed."""
    parts = text.split()
    if len(parts) != 2:
        raise RouteNotFound(
            f"{text!r} is not a request: write it as 'METHOD /path', e.g. 'GET /user/42'"
        )
    method = parts[0].upper()
    if method not in METHODS:
        raise RouteNotFound(f"unknown HTTP method {parts[0]!r} (use one of {', '.join(METHODS)})")
    target = parts[1]
    if not target.startswith("/"):
        raise RouteNotFound(f"{target!r} is not a path: it starts with '/'")
    return method, target


@dataclass(frozen=True, slots=True)
class _Template:
    entry: RouteEntry
    host: re.Pattern[str] | None
    path: re.Pattern[str]
    rank: tuple[int, int, int, int]


def _rank(template: str) -> tuple[int, int, int, int]:
    """Sort key of a template: no `:path` param, fewer params, more literal text, then
    typed params (`{n:int}`) before plain ones."""
    params = _PARAM.findall(template)
    literal = len(_PARAM.sub("", template))
    greedy = sum(1 for _, conv in params if conv == "path")
    plain = sum(1 for _, conv in params if conv in ("", "str"))
    return greedy, len(params), -literal, plain


def _compile(entry: RouteEntry) -> _Template:
    path = entry.path
    host = None
    if path.startswith("//"):
        host_text, _, rest = path[2:].partition("/")
        host = compile_path(host_text)[0]
        path = "/" + rest
    return _Template(entry, host, compile_path(path)[0], _rank(entry.path))


def _match(template: _Template, host: str | None, path: str) -> dict[str, str] | None:
    if (template.host is None) != (host is None):
        return None
    params: dict[str, str] = {}
    if template.host is not None:
        assert host is not None
        found = template.host.match(host)
        if found is None:
            return None
        params.update(found.groupdict())
    found = template.path.match(path)
    if found is None:
        return None
    params.update(found.groupdict())
    return params


def _candidates(policies: PolicySet, method: str) -> list[RouteEntry]:
    own = [e for e in policies.routes.values() if e.method == method]
    if method == "HEAD":
        heads = {(e.method, e.match_key[1]) for e in own}
        own += [
            e
            for e in policies.routes.values()
            if e.method == "GET" and ("HEAD", e.match_key[1]) not in heads
        ]
    return own


def resolve_request(policies: PolicySet, text: str) -> Resolved:
    """The route that governs `METHOD TARGET`; raise RouteNotFound with a hint otherwise."""
    method, target = split_request(text)
    path, _, query = target.partition("?")
    host: str | None = None
    concrete = path
    if path.startswith("//"):
        host_part, _, rest = path[2:].partition("/")
        host, concrete = host_part.lower(), "/" + rest
    exact = policies.get(method, path)
    if exact is not None:
        return Resolved(exact.key, method, concrete, query, host, {}, exact)
    matches: list[tuple[tuple[int, int, int, int], RouteEntry, dict[str, str]]] = []
    for entry in _candidates(policies, method):
        template = _compile(entry)
        params = _match(template, host, concrete)
        if params is not None:
            matches.append((template.rank, entry, params))
    if not matches:
        raise RouteNotFound(_not_found(method, path, policies.routes.values()))
    matches.sort(key=lambda m: m[0])
    if len(matches) > 1 and matches[0][0] == matches[1][0]:
        tied = " and ".join(repr(m[1].key) for m in matches if m[0] == matches[0][0])
        raise RouteNotFound(
            f"{method} {path} matches {tied} equally; name the route by its template"
        )
    _, entry, params = matches[0]
    return Resolved(entry.key, method, concrete, query, host, params, entry)


def _not_found(method: str, path: str, entries: Iterable[RouteEntry]) -> str:
    by_path: dict[str, list[str]] = {}
    for e in entries:
        by_path.setdefault(_PARAM.sub("{}", e.path), []).append(e.key)
    close = difflib.get_close_matches(path, list(by_path), n=3, cutoff=0.5)
    keys = [k for p in close for k in sorted(by_path[p], key=lambda k: k.split()[0] != method)]
    hint = f"; close: {', '.join(keys[:3])}" if keys else ""
    return f"no route of the policies matches {method} {path}{hint}"


def route_key(policies: PolicySet, text: str) -> str | None:
    """The route key `text` resolves to, or None (for callers that report it themselves)."""
    try:
        return resolve_request(policies, text).key
    except RouteNotFound:
        return None
