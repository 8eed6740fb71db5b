"""Pure functions from a merged route policy to an immutable chain of steps.

Each policy key has one `make_<key>(policy, env) -> Step | None`; an absent key makes
no step. The makers run in the fixed order of the request path (deny cheap first).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..errors import ConfigError, Finding, Location
from ..language.loader import PolicySet, RouteEntry, Source
from ..language.policy import GlobalSettings, RoutePolicy
from .chain import Chain
from .deny import DenyStep
from .step import Step


@dataclass(frozen=True, slots=True)
class Env:
    """What makers may use besides the route's policy: settings and backend services."""

    settings: GlobalSettings
    config: Settings = field(default_factory=Settings)
    services: Mapping[str, Any] = field(default_factory=dict)

    def service(self, name: str, why: str) -> Any:
        """A backend service by name; raise MissingService (a config finding) when absent."""
        found = self.services.get(name)
        if found is None:
            raise MissingService(name, why)
        return found


class MissingService(Exception):  # noqa: N818 - converted to a Finding by compile_route
    """A step needs a backend that is not configured."""

    def __init__(self, name: str, why: str) -> None:
        self.name = name
        self.why = why
        super().__init__(f"{why} needs the {name} backend; {backend_hint(name)}")


_SETTINGS = {
    "valkey": "POLICYROUTE_VALKEY_URL",
    "pulsar": "POLICYROUTE_PULSAR_URL",
    "keyring": "POLICYROUTE_DATA_KEYS",
}


def backend_hint(name: str) -> str:
    """How to give the app a backend: its setting, and `policyroute run` for dev servers."""
    hint = f"set {_SETTINGS.get(name, name)}"
    if name in ("valkey", "pulsar"):
        hint += " (`policyroute run` starts an embedded one when it is not set)"
    return hint


def missing_backend(found: Sequence[tuple[RouteEntry, MissingService]]) -> Finding:
    """One finding for every route that needs the same absent backend (at the first)."""
    entry, first = found[0]
    if len(found) == 1:
        return Finding(
            "missing-backend", f"{entry.key}: {first}", entry.location, ("routes", entry.key)
        )
    whys = list(dict.fromkeys(exc.why for _, exc in found))
    others = f"{len(found) - 1} other route{'s' if len(found) > 2 else ''}"
    return Finding(
        "missing-backend",
        f"{entry.key} and {others}: {', '.join(whys)} need{'s' if len(whys) == 1 else ''} "
        f"the {first.name} backend; {backend_hint(first.name)}",
        entry.location,
        ("routes", entry.key),
    )


Maker = Callable[[RoutePolicy, Env], Step | None]

# (policy keys a maker reads, maker), in request-path order. Later capabilities append here.
MAKERS: list[tuple[tuple[str, ...], Maker]] = []

# Keys that shape other steps or only mark the route; they never make a step on their own.
PASSIVE_KEYS = frozenset({"use", "public", "enforce"})


def register(keys: tuple[str, ...], maker: Maker, *, before: str | None = None) -> None:
    """Add a maker for `keys`, optionally before the maker of another key."""
    if before is not None:
        for i, (known, _) in enumerate(MAKERS):
            if before in known:
                MAKERS.insert(i, (keys, maker))
                return
    MAKERS.append((keys, maker))


def enforced_keys() -> frozenset[str]:
    """Every policy key this version turns into a step."""
    return frozenset(k for keys, _ in MAKERS for k in keys) | PASSIVE_KEYS


def unenforced(policy: RoutePolicy) -> list[str]:
    """Keys the policy sets that no step of this version enforces yet."""
    known = enforced_keys()
    return [k for k in policy.model_fields_set if k not in known and getattr(policy, k)]


# The keys that need a verified token.
TOKEN_KEYS = ("scopes", "roles", "mfa", "replay")


def no_issuer_findings(policies: PolicySet) -> list[Finding]:
    """Each route that needs a bearer token while settings.auth names no issuer to verify it.

    One finding per route, at the first of `scopes`, `roles`, `mfa`, `replay` it sets as
    written (its own keys before those of its profiles and defaults), else at the route's
    key: a route that is not public needs a token all the same.
    """
    if policies.settings.auth.issuers:
        return []
    out = []
    for entry in policies.routes.values():
        if entry.policy.public:
            continue
        keys = [k for k in TOKEN_KEYS if getattr(entry.policy, k) and k in entry.origins]
        key = min(keys, key=lambda k: _written_at(entry.origins[k][-1]), default=None)
        if key:
            needs = f"{entry.key} sets `{key}`, which needs a verified bearer token"
            fix = "add one under settings.auth.issuers"
        else:
            needs = f"{entry.key} is not `public: true`, so it needs a verified bearer token"
            fix = "add one under settings.auth.issuers, or make the route `public: true`"
        out.append(
            Finding(
                "no-issuer",
                f"{needs}, but settings.auth.issuers names no issuer to verify it: {fix}",
                entry.origins[key][-1].location if key else entry.location,
                ("routes", entry.key, key) if key else ("routes", entry.key),
            )
        )
    return sorted(out, key=lambda f: (f.location.file, f.location.line, f.location.column))


def _written_at(source: Source) -> tuple[bool, int, int]:
    return source.label != "route", source.location.line, source.location.column


def compile_route(entry: RouteEntry, env: Env) -> Chain:
    """The chain for one route; raise ConfigError when it sets a key nothing enforces or
    needs a backend that is not configured."""
    try:
        return _compile(entry, env)
    except MissingService as exc:
        raise ConfigError([missing_backend([(entry, exc)])]) from None


def _compile(entry: RouteEntry, env: Env) -> Chain:
    missing = unenforced(entry.policy)
    if missing:
        raise ConfigError(
            [
                Finding(
                    "not-enforced",
                    f"{entry.key} sets {', '.join(missing)}, which this version cannot enforce; "
                    "refusing to start rather than leave the route unprotected",
                    entry.origins[k][-1].location if k in entry.origins else entry.location,
                    ("routes", entry.key, k),
                )
                for k in missing
            ]
        )
    steps = tuple(step for _, make in MAKERS if (step := make(entry.policy, env)) is not None)
    notes = ("public: no authentication",) if entry.policy.public else ()
    return Chain(entry.key, steps, entry.location, notes)


def compile_all(policies: PolicySet, env: Env) -> dict[tuple[str, str], Chain]:
    """Chains for every route of a policy set; collects every route's findings.

    Routes that need the same absent backend make one finding (a server started without
    POLICYROUTE_VALKEY_URL prints one line, not one per route).
    """
    chains: dict[tuple[str, str], Chain] = {}
    findings: list[Finding] = []
    # The auth maker knows no position; the set's first route that needs an issuer has one.
    no_issuer = next(iter(no_issuer_findings(policies)), None)
    absent: dict[str, list[tuple[RouteEntry, MissingService]]] = {}
    for match, entry in policies.routes.items():
        try:
            chains[match] = _compile(entry, env)
        except MissingService as exc:
            absent.setdefault(exc.name, []).append((entry, exc))
        except ConfigError as exc:
            findings.extend(
                no_issuer if no_issuer and f.code == "no-issuer" else f for f in exc.findings
            )
    findings.extend(missing_backend(found) for found in absent.values())
    if findings:
        raise ConfigError(list(dict.fromkeys(findings)))  # settings findings repeat per route
    return chains


def deny_chain(method: str, path: str, origin: Location | None = None) -> Chain:
    """The chain of an app route that no policy names: refuse everything."""
    route = f"{method} {path}"
    return Chain(route, (DenyStep(route),), origin)
