"""The engine of one app: its policies, compiled chains and services, and the hooks
through which features attach to it.

The engine loads and compiles the policies, binds each chain once into a `Snapshot` and
swaps snapshots whole on reload; the gate calls `Engine.decide` for every request. What
else an app gets (the OpenAPI document, reload on file change or SIGHUP, health routes,
sanitized logs, resilience profiles) attaches through the `Hook`s `install` passes in:
the engine calls them at its moments and imports none of them.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from ..asgi.api_docs import with_api_docs
from ..asgi.chain import BoundChain
from ..asgi.coverage import no_policy_finding, unmatched_entries, unpolicied
from ..asgi.gate import Decider, Endpoint, endpoints
from ..compile.chain import Chain
from ..compile.compiler import Env, compile_all, deny_chain
from ..compile.step import Step
from ..config import Settings
from ..errors import ConfigError
from ..language.loader import PolicySet, load_policies
from ..language.policy import normalize_path
from ..observability.repeats import BACKEND as BACKEND_WARNINGS
from ..observability.requests import RequestIds
from .changes import Reloaded, file_digests

log = logging.getLogger("policyroute")

ServiceFactory = Callable[["Engine"], Mapping[str, Any]]


class Hook:
    """A feature attached to an engine; each method is one moment of the engine's life,
    and does nothing unless the feature overrides it."""

    def attach(self, engine: Engine) -> None:
        """At install, once the policies compiled: add routes, services or wrappers."""

    def services(
        self, engine: Engine, policies: PolicySet, services: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """The services the makers see when `policies` compile: `services`, or more."""
        return services

    def check(self, engine: Engine, policies: PolicySet) -> None:
        """Before a reload compiles `policies`: raise ConfigError to refuse it."""

    def reloaded(self, engine: Engine, error: ConfigError | None, seconds: float) -> None:
        """After a reload: applied (`error` is None) or refused."""


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
        hooks: Iterable[Hook] = (),
    ) -> None:
        self.app = app
        self.paths = paths
        self.config = config
        self.strict = strict
        self.hooks = tuple(hooks)
        self.last_reload_error: ConfigError | None = None
        self.last_reload: Reloaded | None = None  # what the last applied reload changed
        policies = with_api_docs(load_policies(*paths), app)
        self._digests = file_digests(policies.files)
        self.services: Mapping[str, Any] = services(self) if services else {}
        self.ids = RequestIds(config.request_id_header)
        self.snapshot = self._build(policies)
        # What the gate asks on every request (compiled; reads `snapshot` as it is then).
        self.decider = Decider(self)

    def attach(self) -> None:
        """Let each hook attach its feature (`install` calls this once)."""
        for hook in self.hooks:
            hook.attach(self)

    def env(self, policies: PolicySet) -> Env:
        """The compile environment for a policy set (services as the hooks extend them)."""
        services = self.services
        for hook in self.hooks:
            services = hook.services(self, policies, services)
        return Env(policies.settings, self.config, services)

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

    def decide(self, method: str, endpoint: Endpoint) -> BoundChain:
        """The chain of the resolved endpoint for `method` (the gate runs it, then dispatches)."""
        return self.decider(method, endpoint)  # type: ignore[return-value]

    def reload(self) -> ConfigError | None:
        """Load, check, compile and swap all chains at once; keep the old ones on any error."""
        started = time.perf_counter()
        try:
            policies = load_policies(*self.paths)
            for hook in self.hooks:
                hook.check(self, policies)  # the reload hook runs lint's rules here
            policies = with_api_docs(policies, self.app)
            snapshot = self._build(policies)
        except ConfigError as exc:
            self.last_reload_error = exc  # carries every finding, for /readyz
            log.error("policyroute: reload refused, keeping the last good policy:\n%s", exc)
            self._reloaded(exc, time.perf_counter() - started)
            return exc
        digests = file_digests(policies.files)
        old = self.snapshot.policies
        self.last_reload = Reloaded.between(old, policies, self._digests, digests)
        self.snapshot = snapshot
        self._digests = digests
        self.last_reload_error = None
        self._reloaded(None, time.perf_counter() - started)
        return None

    def _reloaded(self, error: ConfigError | None, seconds: float) -> None:
        for hook in self.hooks:
            hook.reloaded(self, error, seconds)

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
