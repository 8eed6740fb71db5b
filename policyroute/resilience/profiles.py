"""Named resilience profiles: the install hook, config checks, and `@resilient("name")`."""

from __future__ import annotations

import difflib
import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from ..backends.valkey import Store
from ..errors import ConfigError, Finding, Location
from ..language._yaml import Located, load_yaml
from ..language._yaml import Path as KeyPath
from ..language.loader import PolicySet, RouteEntry
from ..language.policy import RETRY_CONDITIONS, Resilience, RoutePolicy
from .breaker import CircuitBreaker, LocalBreaker, SharedBreaker
from .guard import Guard, Spec
from .names import resolve_all, resolve_exception

P = ParamSpec("P")
T = TypeVar("T")

# The compile-environment service through which route makers see the profiles.
PROFILES_SERVICE = "resilience_profiles"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class BoundEngine(Protocol):
    """What the profiles keep of the engine they were bound for (`policyroute.Engine`):
    `@resilient` coroutines read its services and current snapshot."""

    services: Mapping[str, Any]


class Registry:
    """One engine's guards and breakers; kept across reloads that keep a guard's settings."""

    def __init__(self) -> None:
        self._guards: dict[tuple[str, str], Guard] = {}
        self._profiles: dict[str, tuple[Resilience, Guard]] = {}

    def guard(self, identity: str, label: str, spec: Spec, store: Store | None) -> Guard:
        """The guard of one route or profile with these settings (one breaker each)."""
        key = (identity, spec.fingerprint())
        found = self._guards.get(key)
        if found is None:
            found = Guard(label, spec, _breaker(identity, label, spec, store))
            self._guards[key] = found
        return found

    def profile_guard(self, name: str, profile: Resilience, store: Store | None) -> Guard:
        """The guard of a `@resilient(name)` coroutine, rebuilt only when the profile changes."""
        hit = self._profiles.get(name)
        if hit is not None and hit[0] is profile:
            return hit[1]
        guard = self.guard("@" + name, name, Spec.of_profile(name, profile), store)
        self._profiles[name] = (profile, guard)
        return guard


def _breaker(identity: str, label: str, spec: Spec, store: Store | None) -> CircuitBreaker | None:
    if spec.breaker is None:
        return None
    local = LocalBreaker(label, spec.breaker, spec.exclude)
    if not spec.breaker.shared:
        return local
    if store is None:
        raise ConfigError(
            [Finding("missing-backend", f"{label}: a shared breaker needs Valkey", Location(label))]
        )
    return SharedBreaker(label, identity, spec.breaker, store, local, spec.lease())


@dataclass(frozen=True, slots=True)
class Profiles:
    """What route makers see: the engine's registry and the current policy's profiles."""

    registry: Registry
    profiles: Mapping[str, Resilience]


_REGISTRIES: weakref.WeakKeyDictionary[BoundEngine, Registry] = weakref.WeakKeyDictionary()
_current: weakref.ref[BoundEngine] | None = None


@dataclass(eq=False, slots=True, weakref_slot=True)
class Declaration:
    """One `@resilient(name)` in the source: the profile it names and where."""

    name: str
    location: Location


# Weak: a decorated coroutine that no longer exists names nothing.
_DECLARED: weakref.WeakSet[Declaration] = weakref.WeakSet()


def bind(
    engine: BoundEngine, policies: PolicySet, services: Mapping[str, Any]
) -> Mapping[str, Any]:
    """At install and reload: check the profiles, make them current, return `services`
    plus the profiles for the makers.

    Raises ConfigError (install refuses to start, a reload keeps the last good policy) when
    a route or a `@resilient` names an unknown profile or an exception that does not exist.
    """
    global _current
    findings = check(policies, has_valkey="valkey" in services)
    if findings:
        raise ConfigError(findings)
    registry = _REGISTRIES.get(engine)
    if registry is None:
        registry = _REGISTRIES[engine] = Registry()
    _current = weakref.ref(engine)
    return {**services, PROFILES_SERVICE: Profiles(registry, policies.resilience)}


def with_profiles(policies: PolicySet, services: Mapping[str, Any]) -> dict[str, Any]:
    """Compile services plus a policy set's profiles, for compiling outside an engine."""
    return {**services, PROFILES_SERVICE: Profiles(Registry(), policies.resilience)}


def check(policies: PolicySet, *, has_valkey: bool = True) -> list[Finding]:
    """Install-time findings: unknown profiles and exceptions, shared breakers without Valkey."""
    locate = _ProfileLocator(policies.files)
    findings: list[Finding] = []
    for name, profile in policies.resilience.items():
        findings.extend(_profile_findings(name, profile, locate, has_valkey))
    for entry in policies.routes.values():
        findings.extend(route_findings(entry, policies.resilience))
    for decl in sorted(_DECLARED, key=lambda d: (d.location.file, d.location.line)):
        if decl.name not in policies.resilience:
            findings.append(
                Finding(
                    "unknown-resilience-profile",
                    f"@resilient({decl.name!r}) names no profile of the `resilience:` section"
                    + _hint(decl.name, policies.resilience),
                    decl.location,
                    ("resilience", decl.name),
                )
            )
    return findings


def lint_findings(policies: PolicySet) -> list[Finding]:
    """Lint: the install-time checks plus `retry-unsafe` (retrying what is unsafe to repeat)."""
    findings = check(policies)
    for entry in policies.routes.values():
        unsafe = retry_unsafe(entry, policies.resilience)
        if unsafe is not None:
            findings.append(unsafe)
    return findings


def effective(policy: RoutePolicy, profiles: Mapping[str, Resilience]) -> Resilience | None:
    """A route's retry, breaker and timeout: its own keys over its profile's; None if unknown."""
    base = Resilience()
    if policy.resilience is not None:
        found = profiles.get(policy.resilience)
        if found is None:
            return None
        base = found
    return Resilience.model_construct(
        retry=policy.retry if policy.retry is not None else base.retry,
        breaker=policy.breaker if policy.breaker is not None else base.breaker,
        timeout=policy.timeout if policy.timeout is not None else base.timeout,
    )


def route_findings(entry: RouteEntry, profiles: Mapping[str, Resilience]) -> list[Finding]:
    """A route's unknown profile name, unknown exception names, or non-positive timeout."""
    policy = entry.policy
    out: list[Finding] = []
    if policy.resilience is not None and policy.resilience not in profiles:
        out.append(
            Finding(
                "unknown-resilience-profile",
                f"{entry.key} uses resilience profile {policy.resilience!r}, which no "
                "`resilience:` section defines" + _hint(policy.resilience, profiles),
                _where(entry, "resilience"),
                ("routes", entry.key, "resilience"),
            )
        )
    if policy.timeout is not None and policy.timeout <= 0:
        out.append(
            Finding(
                "invalid-value",
                "`timeout` must be a positive duration",
                _where(entry, "timeout"),
                ("routes", entry.key, "timeout"),
            )
        )
    try:
        Spec.build(policy.retry, policy.breaker, None)
    except ValueError as exc:
        key = "retry" if policy.retry is not None and _bad(policy.retry.exceptions) else "breaker"
        out.append(
            Finding("unknown-exception", str(exc), _where(entry, key), ("routes", entry.key, key))
        )
    return out


def retry_unsafe(entry: RouteEntry, profiles: Mapping[str, Resilience]) -> Finding | None:
    """An unsafe method retried with no `idempotency` key to tell repeats apart."""
    if entry.method in SAFE_METHODS or entry.policy.idempotency is not None:
        return None
    found = effective(entry.policy, profiles)
    if found is None or found.retry is None or found.retry.attempts < 2:
        return None
    key = "retry" if entry.policy.retry is not None else "resilience"
    return Finding(
        "retry-unsafe",
        f"{entry.key} retries {entry.method} requests, which are not safe to repeat, and has "
        "no `idempotency`: set `idempotency` so only requests carrying an Idempotency-Key "
        "are retried (others run once), or remove the retry",
        _where(entry, key),
        ("routes", entry.key, key),
    )


def _bad(names: list[str]) -> bool:
    try:
        resolve_all(names)
    except ValueError:
        return True
    return False


def _where(entry: RouteEntry, key: str) -> Location:
    sources = entry.origins.get(key)
    return sources[-1].location if sources else entry.location


def _hint(name: str, known: Iterable[str]) -> str:
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f" (defined: {', '.join(names)})" if names else " (no profiles are defined)"


class _ProfileLocator:
    """Positions in `resilience:` sections, read from the files only when a finding needs one."""

    def __init__(self, files: Iterable[str]) -> None:
        self.files = tuple(files)
        self._docs: list[Located] | None = None

    def __call__(self, path: KeyPath) -> Location:
        if self._docs is None:
            self._docs = []
            for file in self.files:
                try:
                    self._docs.append(load_yaml(Path(file).read_text("utf-8"), file))
                except (OSError, ValueError, ConfigError):
                    continue
        for doc in self._docs:
            section = doc.data.get("resilience") if isinstance(doc.data, dict) else None
            if isinstance(section, dict) and path[1] in section:
                # YAML 1.1 keeps the key `on` as "True" (see policy.Retry).
                yaml_path = tuple("True" if p == "on" else p for p in path)
                return doc.location(yaml_path if yaml_path in doc.values else path)
        return Location(self.files[0] if self.files else "<policy>")


def _profile_findings(
    name: str, profile: Resilience, locate: _ProfileLocator, has_valkey: bool
) -> list[Finding]:
    out: list[Finding] = []
    named: list[tuple[KeyPath, str]] = []
    if profile.retry is not None:
        named += [
            (("resilience", name, "retry", "on", i), item)
            for i, item in enumerate(profile.retry.on)
            if item not in RETRY_CONDITIONS
        ]
    if profile.breaker is not None:
        named += [
            (("resilience", name, "breaker", "exclude", i), item)
            for i, item in enumerate(profile.breaker.exclude)
        ]
    for path, item in named:
        try:
            resolve_exception(item)
        except ValueError as exc:
            out.append(Finding("unknown-exception", str(exc), locate(path), path))
    if profile.breaker is not None and profile.breaker.shared and not has_valkey:
        path = ("resilience", name, "breaker", "shared")
        out.append(
            Finding(
                "missing-backend",
                f"resilience profile {name!r} shares its breaker, which needs the valkey "
                "backend; set POLICYROUTE_VALKEY_URL",
                locate(path),
                path,
            )
        )
    return out


def _site(fn: Callable[..., Any]) -> Location:
    code = getattr(fn, "__code__", None)
    if code is None:
        return Location(getattr(fn, "__qualname__", "<coroutine>"))
    return Location(code.co_filename, code.co_firstlineno, 1)


def _guard_for(decl: Declaration) -> Guard:
    engine = _current() if _current is not None else None
    snapshot = getattr(engine, "snapshot", None)
    if engine is None or snapshot is None:
        raise ConfigError(
            [
                Finding(
                    "not-installed",
                    f"@resilient({decl.name!r}) was called before policyroute.install(); "
                    "its profile comes from the installed policies",
                    decl.location,
                )
            ]
        )
    profile = snapshot.policies.resilience.get(decl.name)
    if profile is None:
        raise ConfigError(
            [
                Finding(
                    "unknown-resilience-profile",
                    f"@resilient({decl.name!r}) names no profile of the `resilience:` section"
                    + _hint(decl.name, snapshot.policies.resilience),
                    decl.location,
                    ("resilience", decl.name),
                )
            ]
        )
    registry = _REGISTRIES[engine]
    return registry.profile_guard(decl.name, profile, engine.services.get("valkey"))


def resilient(name: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Run a coroutine function under the named `resilience:` profile (breaker, retry, timeout).

    The profile is read from the installed policies at each call, so a reload applies at
    once; `install` refuses to start when no profile has this name. An open breaker raises
    `CircuitOpen` (a Denial: 503 with Retry-After if it reaches a route); a last attempt
    that timed out raises `AttemptTimeout` (a TimeoutError).
    """

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@resilient({name!r}) decorates coroutine functions (async def)")
        decl = Declaration(name, _site(fn))
        _DECLARED.add(decl)

        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            return await _guard_for(decl).run(lambda: fn(*args, **kwargs))

        guarded.__policyroute_resilient__ = decl  # type: ignore[attr-defined]
        return guarded

    return decorate
