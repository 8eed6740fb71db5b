"""`policyroute explain`: each route's compiled chain and where each setting came from.

The effective policy lists every key a layer wrote, with every value inside it (built-in
defaults included), and for each value the layer and file:line:col it came from:
`defaults` (of any file), `profile NAME` (in `use:` order) or `route`. A list comes whole
from the last layer that wrote it (lists replace), so each item points into that layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from ._positions import Doc, KeyPath, read_docs
from .backends.valkey import ValkeyStore
from .chain import Chain
from .compiler import Env, compile_route
from .crypto import Keyring
from .events.bus import EventBus
from .loader import PolicySet, RouteEntry, load_policies
from .policy import RoutePolicy
from .resilience import with_profiles
from .resolve import route_key
from .services import OFFLINE_PULSAR_URL, OFFLINE_VALKEY_URL

BUILT_IN = "   (built-in default)"


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

    def of(self, path: KeyPath, value: Any) -> str:
        """`   <- LAYER at file:line:col`, or the built-in default marker."""
        found: tuple[Layer, KeyPath, bool] | None = None
        for layer in self.layers:
            hit = _written(layer, path)
            if hit is not None:
                found = (layer, *hit)
        if found is None:
            return BUILT_IN
        layer, at, exact = found
        kind = layer.doc.kinds.get(at)
        if kind == "null":
            return f"   (removed by {layer.label} at {_mark(layer.doc, at)})"
        if not exact and not (kind == "scalar" and layer.doc.scalars.get(at) == str(value)):
            return BUILT_IN  # the layer wrote the object, not this value inside it
        return f"   <- {layer.label} at {_mark(layer.doc, at)}"


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
    return f"{doc.file}:{mark[0]}:{mark[1]}"


def _scalar(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _render(value: Any, path: KeyPath, pad: str, attribute: Provenance) -> list[str]:
    lines: list[str] = []
    for key, item in value.items():
        here = (*path, key)
        if item is None:
            note = attribute.of(here, None)
            if note.startswith("   (removed"):
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


def effective_policy(entry: RouteEntry, policies: PolicySet, docs: dict[str, Doc]) -> list[str]:
    """The lines of a route's effective policy, each value with where it came from."""
    attribute = Provenance(entry, policies, docs)
    dumped = entry.policy.model_dump(mode="json")
    written = {k: dumped[k] for k in RoutePolicy.model_fields if k in entry.origins}
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
        self.layers = [layer]


def explain(
    paths: Sequence[str | Path], app: FastAPI | None = None, route: str | None = None
) -> str:
    """Text describing each route's chain (all routes, or only `route`)."""
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
    docs: dict[str, Doc] | None = None
    blocks: list[str] = []
    for chain in chains:
        if wanted is not None and wanted != chain.route:
            continue
        lines = [repr(chain)]
        entry = by_route.get(chain.route)
        if entry is not None:
            if docs is None:
                docs = {d.file: d for d in read_docs(policies.files)}
            lines.extend(effective_policy(entry, policies, docs))
        blocks.append("\n".join(lines))
    if route is not None and not blocks:
        return f"no route {route!r} in the policies"
    return "\n\n".join(blocks)
