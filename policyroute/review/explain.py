"""`policyroute explain`: each route's compiled chain and where each setting came from.

The effective policy lists every key a layer wrote, with every value inside it (built-in
defaults included), and for each value the layer and file:line:col it came from:
`defaults` (of any file), `profile NAME` (in `use:` order) or `route`. A list comes whole
from the last layer that wrote it (lists replace), so each item points into that layer.
Values are written as in a policy file (`true`, `30s`, `1MiB`); files are named relative
to the working directory. `explain_json` gives the same as data (`--format json`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI

from ..backends.offline import OFFLINE_PULSAR_URL, OFFLINE_VALKEY_URL
from ..backends.valkey import ValkeyStore
from ..compile.chain import Chain
from ..compile.compiler import Env, compile_route
from ..crypto import Keyring
from ..errors import Location, PolicyrouteError
from ..events.bus import EventBus
from ..language._positions import Doc, KeyPath, read_docs
from ..language.loader import PolicySet, RouteEntry, load_policies
from ..language.policy import RoutePolicy
from ..language.resolve import route_key
from ..resilience import with_profiles
from .lint import relative

BUILT_IN = "   (built-in default)"


class UnknownRouteError(PolicyrouteError):
    """`explain ROUTE` named a route no policy (or app route) has."""


def _relative(location: Location) -> Location:
    return dataclasses.replace(location, file=relative(location.file))


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one value of the effective policy comes from."""

    kind: Literal["layer", "default", "removed"]
    label: str = ""
    where: str = ""

    def __str__(self) -> str:
        if self.kind == "default":
            return BUILT_IN
        if self.kind == "removed":
            return f"   (removed by {self.label} at {self.where})"
        return f"   <- {self.label} at {self.where}"

    def as_text(self) -> str:
        """The origin in words, for JSON: `route at f:l:c`, `built-in default`..."""
        return str(self).strip().removeprefix("<- ").strip("()")


DEFAULT = Origin("default")


def _offline_services() -> dict[str, Any]:
    # Clients connect lazily, so explain compiles real steps without touching a backend.
    store = ValkeyStore(OFFLINE_VALKEY_URL)
    bus = EventBus(OFFLINE_PULSAR_URL, store=store, offline=True)
    services: dict[str, Any] = {"valkey": store, "pulsar": bus}
    keyring = Keyring.from_env()
    # explain shows sealed routes' chains even where no data keys are configured
    services["keyring"] = keyring or Keyring.parse(Keyring.generate("explain"))
    return services


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer of a route's merge, where it lives in its file."""

    label: str
    doc: Doc
    base: KeyPath


class Provenance:
    """Which layer wrote each value of one route's merged policy, and where."""

    def __init__(self, entry: RouteEntry, policies: PolicySet, docs: dict[str, Doc]) -> None:
        self.origins = entry.origins
        self.layers: list[Layer] = []
        labels = {s.label for sources in entry.origins.values() for s in sources}
        if "defaults" in labels:
            for file in policies.files:
                doc = docs.get(file)
                if doc is not None and doc.kinds.get(("defaults",)) in ("map", "null"):
                    self.layers.append(Layer("defaults", doc, ("defaults",)))
        for name in entry.policy.use:
            where = policies.profiles.get(name)
            doc = docs.get(where.file) if where else None
            if doc is not None:
                self.layers.append(Layer(f"profile {name}", doc, ("profiles", name)))
        doc = docs.get(entry.location.file)
        if doc is not None:
            self.layers.append(Layer("route", doc, ("routes", entry.key)))

    def of(self, path: KeyPath, value: Any) -> Origin:
        """The layer that wrote the value at `path` and where, or the built-in default."""
        found: tuple[Layer, KeyPath, bool] | None = None
        for layer in self.layers:
            hit = _written(layer, path)
            if hit is not None:
                found = (layer, *hit)
        if found is None:
            return self._unwritten(path)
        layer, at, exact = found
        kind = layer.doc.kinds.get(at)
        if kind == "null":
            return Origin("removed", layer.label, _mark(layer.doc, at))
        if not exact and not (kind == "scalar" and layer.doc.scalars.get(at) == str(value)):
            return DEFAULT  # the layer wrote the object, not this value inside it
        return Origin("layer", layer.label, _mark(layer.doc, at))


    def _unwritten(self, path: KeyPath) -> Origin:
        """A value no file layer wrote: a built-in default, or set by a setting
        (`settings.api_docs` makes its routes public)."""
        sources = self.origins.get(str(path[0]), ()) if len(path) == 1 else ()
        source = sources[-1] if sources else None
        if source is None or source.label in ("defaults", "route") or " " in source.label:
            return DEFAULT
        return Origin("layer", source.label, str(_relative(source.location)))


def _written(layer: Layer, path: KeyPath) -> tuple[KeyPath, bool] | None:
    """Where `layer` decides the value at `path` (and whether exactly), or None."""
    kinds = layer.doc.kinds
    for depth in range(1, len(path) + 1):
        at = (*layer.base, *path[:depth])
        kind = kinds.get(at)
        if kind is None:
            return None
        if kind == "null" or depth == len(path):
            return at, True
        rest = path[depth:]
        if kind == "map" and isinstance(rest[0], int):
            # One mapping where a list is expected: it is the list's only item.
            exact = (*at, *rest[1:])
            return (exact, True) if exact in layer.doc.values else (at, False)
        if kind != "map":
            exact = (*at, *rest)  # a list (or shorthand scalar) replaces the whole value
            return (exact, True) if exact in layer.doc.values else (at, False)
    return None


def _mark(doc: Doc, path: KeyPath) -> str:
    mark = doc.mark(path) or doc.mark(path[:-1]) or (1, 1)
    return f"{relative(doc.file)}:{mark[0]}:{mark[1]}"


def _scalar(value: Any) -> str:
    """A value as a policy file writes it: `true`, `null`, `[a, b]`."""
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _render(value: Any, path: KeyPath, pad: str, attribute: Provenance) -> list[str]:
    lines: list[str] = []
    for key, item in value.items():
        here = (*path, key)
        if item is None:
            note = attribute.of(here, None)
            if note.kind == "removed":
                lines.append(f"{pad}{key}:{note}")
            continue
        if isinstance(item, dict):
            lines.append(f"{pad}{key}:{attribute.of(here, item)}")
            lines.extend(_render(item, here, pad + "  ", attribute))
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            lines.append(f"{pad}{key}:{attribute.of(here, item)}")
            for i, element in enumerate(item):
                block = _render(element, (*here, i), pad + "    ", attribute)
                if block:
                    block[0] = f"{pad}  - {block[0].lstrip()}"
                lines.extend(block)
        else:
            lines.append(f"{pad}{key}: {_scalar(item)}{attribute.of(here, item)}")
    return lines


def _sources(value: Any, path: KeyPath, attribute: Provenance, out: dict[str, str]) -> None:
    """Each value's origin by its dotted path (`rate_limit[0].per`), as `_render` shows them."""
    for key, item in value.items():
        here = (*path, key)
        name = _dotted(here)
        note = attribute.of(here, item)
        if item is None:
            if note.kind == "removed":
                out[name] = note.as_text()
            continue
        out[name] = note.as_text()
        if isinstance(item, dict):
            _sources(item, here, attribute, out)
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            for i, element in enumerate(item):
                _sources(element, (*here, i), attribute, out)


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + part
    return out


def _written_keys(entry: RouteEntry) -> dict[str, Any]:
    dumped = entry.policy.model_dump(mode="json")
    return {k: dumped[k] for k in RoutePolicy.model_fields if k in entry.origins}


def effective_policy(entry: RouteEntry, policies: PolicySet, docs: dict[str, Doc]) -> list[str]:
    """The lines of a route's effective policy, each value with where it came from."""
    attribute = Provenance(entry, policies, docs)
    written = _written_keys(entry)
    lines = ["  effective policy:"]
    lines.extend(_render(written, (), "    ", attribute))
    name = entry.policy.resilience
    if name is not None and name in policies.resilience:
        lines.extend(_profile_lines(name, policies, docs))
    return lines


def _profile_lines(name: str, policies: PolicySet, docs: dict[str, Doc]) -> list[str]:
    holder = next((d for d in docs.values() if ("resilience", name) in d.kinds), None)
    if holder is None:
        return []
    where = _mark(holder, ("resilience", name))
    lines = [f"    resilience profile {name} (at {where}):"]
    profile = policies.resilience[name].model_dump(mode="json")
    single = _Single(Layer(f"resilience {name}", holder, ("resilience", name)))
    lines.extend(_render(profile, (), "      ", single))
    return lines


class _Single(Provenance):
    """Provenance within one layer (a resilience profile)."""

    def __init__(self, layer: Layer) -> None:
        self.origins = {}
        self.layers = [layer]


@dataclass(frozen=True, slots=True)
class Explained:
    """One route's compiled chain and, when a policy names it, its merged policy."""

    chain: Chain
    entry: RouteEntry | None


def _select(
    paths: Sequence[str | Path], app: FastAPI | None, route: str | None
) -> tuple[PolicySet, list[Explained]]:
    """The routes to explain; UnknownRouteError when `route` names none of them."""
    engine = getattr(getattr(app, "state", None), "policyroute", None) if app else None
    if engine is not None:
        policies = engine.snapshot.policies
        chains: list[Chain] = engine.chains()
    else:
        policies = load_policies(*paths)
        env = Env(policies.settings, services=with_profiles(policies, _offline_services()))
        chains = [compile_route(e, env) for e in policies.routes.values()]
    wanted = None
    if route is not None:  # a concrete request (`get /user/42`) names its route's template
        wanted = route_key(policies, route) or " ".join(route.split())
    by_route = {e.key: e for e in policies.routes.values()}
    found = [
        Explained(c, by_route.get(c.route)) for c in chains if wanted is None or wanted == c.route
    ]
    if route is not None and not found:
        raise UnknownRouteError(f"no route {route!r} in the policies")
    return policies, found


def _chain_text(chain: Chain) -> str:
    origin = chain.origin
    if origin is not None:
        chain = dataclasses.replace(chain, origin=_relative(origin))
    return repr(chain)


def explain(
    paths: Sequence[str | Path], app: FastAPI | None = None, route: str | None = None
) -> str:
    """Text describing each route's chain (all routes, or only `route`: UnknownRouteError
    when no policy or app route has it)."""
    policies, found = _select(paths, app, route)
    docs = {d.file: d for d in read_docs(policies.files)} if found else {}
    blocks: list[str] = []
    for item in found:
        lines = [_chain_text(item.chain)]
        if item.entry is not None:
            lines.extend(effective_policy(item.entry, policies, docs))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def explain_json(
    paths: Sequence[str | Path], app: FastAPI | None = None, route: str | None = None
) -> list[dict[str, Any]]:
    """Each route's chain and effective policy as data; UnknownRouteError for a route none has.

    Per route: `route`, `origin` (file:line:col), `notes`, `steps` (name, detail, enforce),
    `policy` (the keys some layer wrote, every value inside them) and `sources` (each
    value's dotted path -> `route at f:l:c`, `profile NAME at ...`, `built-in default`...).
    """
    policies, found = _select(paths, app, route)
    docs = {d.file: d for d in read_docs(policies.files)} if found else {}
    out: list[dict[str, Any]] = []
    for item in found:
        chain, entry = item.chain, item.entry
        data: dict[str, Any] = {
            "route": chain.route,
            "origin": str(_relative(chain.origin)) if chain.origin else None,
            "notes": list(chain.notes),
            "steps": [
                {"name": s.name, "detail": s.describe(), "enforce": s.enforce} for s in chain.steps
            ],
        }
        if entry is not None:
            attribute = Provenance(entry, policies, docs)
            data["policy"] = _written_keys(entry)
            sources: dict[str, str] = {}
            _sources(data["policy"], (), attribute, sources)
            data["sources"] = sources
        out.append(data)
    return out
