"""`settings.api_docs: public`: FastAPI's documentation routes without a policy entry each.

FastAPI serves its OpenAPI document and the pages that render it (`openapi_url`,
`docs_url` with `swagger_ui_oauth2_redirect_url`, `redoc_url`) from routes it adds
itself. With the setting, each of them that the app really serves becomes a public route
of the policy set, written where the setting is: explain, lint, strict mode and the gate
see it like a listed route. A route is one of them only when FastAPI made it (its endpoint
is FastAPI's own) at the URL the app configured: a handler of the app's at `/docs`, a
path below `/docs`, another method or a mounted app's pages are never opened by it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from fastapi import FastAPI
from starlette.routing import Route

from ..errors import Location
from ..language._positions import read_docs
from ..language.loader import PolicySet, RouteEntry, Source
from ..language.policy import RoutePolicy, normalize_path

SETTING = ("settings", "api_docs")
LABEL = "settings.api_docs"
# The endpoints FastAPI.setup() adds, by name, with the app attribute that holds each URL.
_OWN = {
    "openapi": "openapi_url",
    "swagger_ui_html": "docs_url",
    "swagger_ui_redirect": "swagger_ui_oauth2_redirect_url",
    "redoc_html": "redoc_url",
}


def doc_routes(app: FastAPI) -> list[str]:
    """The paths of the documentation routes FastAPI itself serves for `app`."""
    found: list[str] = []
    for route in app.router.routes:
        if not isinstance(route, Route):
            continue
        endpoint = route.endpoint
        attribute = _OWN.get(getattr(endpoint, "__name__", ""))
        if attribute is None or getattr(endpoint, "__module__", "") != "fastapi.applications":
            continue
        if route.path == getattr(app, attribute, None) and route.methods == {"GET", "HEAD"}:
            found.append(route.path)
    return found


def _where(files: Iterable[str]) -> Location:
    for doc in read_docs(files):
        mark = doc.mark(SETTING, key=True)
        if mark is not None:
            return Location(doc.file, *mark)
    return Location("<settings>")


def with_api_docs(policies: PolicySet, app: FastAPI) -> PolicySet:
    """The policy set with a public route for each documentation route of `app` that it
    does not list, when `settings.api_docs` is `public`; else the set unchanged."""
    if policies.settings.api_docs != "public":
        return policies
    missing = [p for p in doc_routes(app) if ("GET", normalize_path(p)) not in policies.routes]
    if not missing:
        return policies
    where = _where(policies.files)
    routes = dict(policies.routes)
    for path in missing:
        source = Source(LABEL, where)
        routes[("GET", normalize_path(path))] = RouteEntry(
            f"GET {path}", "GET", path, RoutePolicy(public=True), where, {"public": (source,)}
        )
    return dataclasses.replace(policies, routes=routes)
