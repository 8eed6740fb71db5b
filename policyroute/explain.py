"""`policyroute explain`: each route's compiled chain and where each setting came from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from .backends.valkey import ValkeyStore
from .chain import Chain
from .compiler import Env, compile_route
from .crypto import Keyring
from .events.bus import EventBus
from .loader import RouteEntry, load_policies
from .resilience import with_profiles
from .services import OFFLINE_PULSAR_URL, OFFLINE_VALKEY_URL


def _offline_services() -> dict[str, Any]:
    # Clients connect lazily, so explain compiles real steps without touching a backend.
    store = ValkeyStore(OFFLINE_VALKEY_URL)
    bus = EventBus(OFFLINE_PULSAR_URL, store=store, offline=True)
    services: dict[str, Any] = {"valkey": store, "pulsar": bus}
    keyring = Keyring.from_env()
    # explain shows sealed routes' chains even where no data keys are configured
    services["keyring"] = keyring or Keyring.parse(Keyring.generate("explain"))
    return services


def _origins(entry: RouteEntry) -> list[str]:
    lines = ["  effective policy:"]
    dumped = entry.policy.model_dump(mode="json", exclude_defaults=True)
    for key, value in dumped.items():
        sources = ", ".join(str(s) for s in entry.origins.get(key, ()))
        lines.append(f"    {key}: {value}" + (f"   <- {sources}" if sources else ""))
    return lines


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
    by_route = {e.key: e for e in policies.routes.values()}
    blocks: list[str] = []
    for chain in chains:
        if route is not None and " ".join(route.split()) != chain.route:
            continue
        lines = [repr(chain)]
        entry = by_route.get(chain.route)
        if entry is not None:
            lines.extend(_origins(entry))
        blocks.append("\n".join(lines))
    if route is not None and not blocks:
        return f"no route {route!r} in the policies"
    return "\n\n".join(blocks)
