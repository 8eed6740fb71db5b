"""`policyroute diff`: what a policy change does, route by route, key by key.

Both sides are loaded as the app would load them (defaults, profiles and `use:` merged,
`loader.load_policies`), so a change to a profile or to `defaults` shows on every route
it reaches, and a reordering that changes nothing shows nothing. Each difference is
classified from the caller's side:

- `loosened`: the route lets more through (a scope or a limit removed, a limit raised, a
  route made public, a cache made shared, an allowlist widened, MFA dropped, credits made
  cheaper, shadow mode switched on, a backend failure now failing open...);
- `tightened`: the opposite;
- `changed`: a difference that is neither (a TTL, a retry schedule, an event topic);
- `added` / `removed`: a route that only one side has (an app route whose policy is
  removed is denied with 403 no-policy).

Routes are matched by method and path with parameter names and converters ignored, so
renaming `{id}` to `{user_id}` is not a remove and an add.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PolicyrouteError
from ..language.loader import PolicySet, RouteEntry, load_policies
from ..language.policy import GlobalSettings, RateLimit, RoutePolicy

KINDS = ("added", "removed", "loosened", "tightened", "changed")
FORMATS = ("text", "json", "markdown")
_PARAM = re.compile(r"\{[^}]*\}")


class DiffError(PolicyrouteError):
    """A side of the diff cannot be read (an unknown git revision, no such path)."""


@dataclass(frozen=True, slots=True)
class Change:
    """One difference of one route's effective policy."""

    kind: str  # one of KINDS
    key: str  # the route key it is under (`scopes`, `rate_limit`), `route` or `settings`
    path: str  # where exactly: `rate_limit[per-user].capacity`
    message: str
    old: Any = None
    new: Any = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "kind": self.kind,
            "key": self.key,
            "path": self.path,
            "message": self.message,
            "old": self.old,
            "new": self.new,
        }


@dataclass(slots=True)
class RouteDiff:
    """The changes of one route (or of the settings, route `settings`)."""

    route: str
    status: str  # added, removed, changed
    location: str = ""
    changes: list[Change] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "route": self.route,
            "status": self.status,
            "location": self.location,
            "changes": [c.as_dict() for c in self.changes],
        }


@dataclass(slots=True)
class PolicyDiff:
    """Every route that differs, in route order."""

    routes: list[RouteDiff] = field(default_factory=list)

    def changes(self) -> Iterator[Change]:
        """Every change of every route."""
        for route in self.routes:
            yield from route.changes

    def count(self) -> dict[str, int]:
        """How many changes of each kind."""
        counts = dict.fromkeys(KINDS, 0)
        for change in self.changes():
            counts[change.kind] += 1
        return counts

    def has(self, kinds: Iterable[str]) -> bool:
        """Whether any change is of one of `kinds`."""
        wanted = set(kinds)
        return any(c.kind in wanted for c in self.changes())


# --- comparing ------------------------------------------------------------------------------


def _ident(entry: RouteEntry) -> tuple[str, str]:
    return entry.method, _PARAM.sub("{}", entry.path)


def _value(value: Any) -> Any:
    """A policy value as JSON data (durations as `30s`, networks as CIDR strings)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_value(v) for v in value]
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value


def _shown(value: Any) -> str:
    data = _value(value)
    if isinstance(data, str):
        return data
    if isinstance(data, bool):
        return "true" if data else "false"
    if data is None:
        return "none"
    if isinstance(data, list) and all(isinstance(v, str) for v in data):
        return "[" + ", ".join(data) + "]"
    return json.dumps(data, separators=(", ", ": "))


class _Collector:
    """Changes of one route, under one key."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.out: list[Change] = []

    def add(self, kind: str, path: str, message: str, old: Any = None, new: Any = None) -> None:
        self.out.append(Change(kind, self.key, path, message, _value(old), _value(new)))

    def scalar(
        self, path: str, old: Any, new: Any, looser: Callable[[Any, Any], bool | None]
    ) -> None:
        """`old -> new`, loosened when `looser(old, new)`, tightened when False, else changed."""
        if old == new:
            return
        verdict = looser(old, new)
        kind = "changed" if verdict is None else "loosened" if verdict else "tightened"
        self.add(kind, path, f"{path}: {_shown(old)} -> {_shown(new)}", old, new)

    def sets(self, path: str, old: Iterable[Any], new: Iterable[Any], *, more_is: str,
             what: str) -> None:
        """Items added and removed; `more_is` is the kind of an added item."""
        before, after = [_shown(v) for v in old], [_shown(v) for v in new]
        less_is = {"loosened": "tightened", "tightened": "loosened"}.get(more_is, more_is)
        for item in after:
            if item not in before:
                self.add(more_is, path, f"{path}: {what} {item} added", None, item)
        for item in before:
            if item not in after:
                self.add(less_is, path, f"{path}: {what} {item} removed", item, None)


def _more(old: Any, new: Any) -> bool:
    """A number went up (for keys where more lets more through)."""
    return bool(new > old)


def _less(old: Any, new: Any) -> bool:
    return bool(new < old)


def _flag_off(old: Any, new: Any) -> bool:
    """A safeguard was switched off (true -> false) loosens."""
    return bool(old and not new)


def _flag_on(old: Any, new: Any) -> bool:
    return bool(new and not old)


def _opened(old: Any, new: Any) -> bool | None:
    """`on_backend_error`: closed -> open loosens."""
    return new == "open" if old != new else None


def _neutral(old: Any, new: Any) -> None:
    return None


def _generic(c: _Collector, path: str, old: Any, new: Any) -> None:
    """Every differing leaf, as `changed`."""
    a, b = _value(old), _value(new)
    if a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            _generic(c, f"{path}.{key}", a.get(key), b.get(key))
        return
    c.add("changed", path, f"{path}: {_shown(a)} -> {_shown(b)}", a, b)


def _networks(values: Sequence[Any]) -> list[Any]:
    nets = [ipaddress.ip_network(str(v)) for v in values]
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def _uncovered(nets: Sequence[Any], by: Sequence[Any]) -> list[Any]:
    """The networks of `nets` that `by` does not wholly contain."""
    return [
        n for n in nets if not any(n.version == m.version and n.subnet_of(m) for m in by)
    ]


def _allowlist(c: _Collector, path: str, old: Any, new: Any, *, none_means: str) -> None:
    """Compare address lists: more addresses loosen. `none_means`: what an unset list allows."""
    if old is None and new is None:
        return
    if old is None or new is None:
        opened = new is None if none_means == "everyone" else old is None
        kind = "loosened" if opened else "tightened"
        state = {
            (True, "everyone"): "removed: every address may call",
            (False, "everyone"): f"set to {_shown(new)}: other addresses are refused",
            (True, "no one"): f"set to {_shown(new)}",
            (False, "no one"): "removed",
        }[(new is None, none_means)]
        c.add(kind, path, f"{path} {state}", old, new)
        return
    before, after = _networks(old), _networks(new)
    wider = _uncovered(after, before)
    narrower = _uncovered(before, after)
    if wider:
        c.add("loosened", path, f"{path} widened: now also {_shown(wider)}", old, new)
    if narrower:
        c.add("tightened", path, f"{path} narrowed: no longer {_shown(narrower)}", old, new)


def _limit_names(limits: Sequence[RateLimit]) -> dict[str, RateLimit]:
    """Limits by the name their headers use (as `steps.rate_limit.compile_limit` names them)."""
    out: dict[str, RateLimit] = {}
    for i, spec in enumerate(limits):
        name = spec.name or (spec.key if spec.algorithm != "concurrency" else "concurrency")
        out[f"{name}-{i}" if name in out else name] = spec
    return out


def _rate(spec: RateLimit) -> float | None:
    """Requests per second a limit sustains (None for concurrency)."""
    if spec.algorithm == "concurrency" or not spec.per:
        return None
    amount = (spec.refill or spec.capacity) if spec.algorithm == "token_bucket" else spec.capacity
    if amount is None:  # a debounce limits repeats, not a rate
        return None
    return amount / spec.per


def _per(spec: RateLimit) -> str:
    rate = _rate(spec)
    if rate is None:
        return f"{spec.capacity} in flight"
    amount = (spec.refill or spec.capacity) if spec.algorithm == "token_bucket" else spec.capacity
    return f"{amount} per {_shown(_value(spec).get('per'))}"


def _rate_limits(c: _Collector, old: RoutePolicy, new: RoutePolicy) -> None:
    before, after = _limit_names(old.rate_limit), _limit_names(new.rate_limit)
    for name, spec in after.items():
        if name not in before:
            c.add("tightened", f"rate_limit[{name}]",
                  f"rate_limit[{name}] added: {spec.capacity} per {spec.key}, {_per(spec)}",
                  None, spec)
    for name, spec in before.items():
        if name not in after:
            c.add("loosened", f"rate_limit[{name}]", f"rate_limit[{name}] removed", spec, None)
            continue
        now = after[name]
        at = f"rate_limit[{name}]"
        if spec.algorithm != now.algorithm or spec.key != now.key:
            c.scalar(f"{at}.algorithm", spec.algorithm, now.algorithm, _neutral)
            c.scalar(f"{at}.key", spec.key, now.key, _neutral)
            continue
        c.scalar(f"{at}.capacity", spec.capacity, now.capacity, _more)
        rate_before, rate_after = _rate(spec), _rate(now)
        if rate_before is not None and rate_after is not None and rate_before != rate_after:
            kind = "loosened" if rate_after > rate_before else "tightened"
            c.add(kind, f"{at}.rate", f"{at}: {_per(spec)} -> {_per(now)}",
                  _value(spec), _value(now))
        c.scalar(f"{at}.cost", spec.cost, now.cost, _less)
        c.scalar(f"{at}.enforce", spec.enforce, now.enforce, _flag_off)
        c.scalar(f"{at}.on_backend_error", spec.on_backend_error, now.on_backend_error, _opened)
        c.scalar(f"{at}.lease", spec.lease, now.lease, _neutral)


def _credits(c: _Collector, old: RoutePolicy, new: RoutePolicy) -> None:
    a, b = old.credits, new.credits
    if a is None or b is None:
        if b is not None:
            c.add("tightened", "credits", f"credits added: cost {b.cost}", None, b)
        elif a is not None:
            c.add("loosened", "credits", f"credits removed: was cost {a.cost}; now free", a, None)
        return
    c.scalar("credits.cost", a.cost, b.cost, _less)
    c.sets("credits.refund_on", a.refund_on, b.refund_on, more_is="loosened", what="refund on")
    c.scalar("credits.on_backend_error", a.on_backend_error, b.on_backend_error, _opened)
    c.scalar("credits.enforce", a.enforce, b.enforce, _flag_off)
    c.scalar("credits.hold", a.hold, b.hold, _neutral)
    if a.allowance != b.allowance:
        if a.allowance is None or b.allowance is None:
            kind = "loosened" if b.allowance is not None else "tightened"
            state = "added" if b.allowance is not None else "removed"
            c.add(kind, "credits.allowance", f"credits.allowance {state}", a.allowance,
                  b.allowance)
        else:
            c.scalar("credits.allowance.amount", a.allowance.amount, b.allowance.amount, _more)
            c.scalar("credits.allowance.every", a.allowance.every, b.allowance.every, _neutral)


def _mfa(c: _Collector, old: RoutePolicy, new: RoutePolicy, sides: tuple[float, float]) -> None:
    a, b = old.mfa, new.mfa
    if a is None or b is None:
        if b is not None:
            c.add("tightened", "mfa", f"mfa added: {', '.join(b.methods)}", None, b)
        elif a is not None:
            c.add("loosened", "mfa", "mfa dropped: no second factor", a, None)
        return
    c.sets("mfa.methods", a.methods, b.methods, more_is="loosened", what="method")
    age_a = a.max_age if a.max_age is not None else sides[0]
    age_b = b.max_age if b.max_age is not None else sides[1]
    c.scalar("mfa.max_age", age_a, age_b, _more)
    c.scalar("mfa.enforce", a.enforce, b.enforce, _flag_off)


def _idempotency(c: _Collector, old: RoutePolicy, new: RoutePolicy) -> None:
    a, b = old.idempotency, new.idempotency
    if a is None or b is None:
        if b is not None:
            c.add("tightened", "idempotency", "idempotency added", None, b)
        elif a is not None:
            c.add("loosened", "idempotency", "idempotency removed: repeats run (and pay) again",
                  a, None)
        return
    c.scalar("idempotency.required", a.required, b.required, _flag_off)
    c.scalar("idempotency.on_backend_error", a.on_backend_error, b.on_backend_error, _opened)
    _generic(c, "idempotency.header", a.header, b.header)
    _generic(c, "idempotency.ttl", a.ttl, b.ttl)
    _generic(c, "idempotency.lock", a.lock, b.lock)


def _cache(c: _Collector, old: RoutePolicy, new: RoutePolicy) -> None:
    a, b = old.cache, new.cache
    if a is None or b is None:
        if b is not None:
            kind = "loosened" if b.shared else "changed"
            who = "shared by every caller" if b.shared else "per caller"
            c.add(kind, "cache", f"cache added ({who}, ttl {_shown(_value(b)['ttl'])})", None, b)
        elif a is not None:
            c.add("changed", "cache", "cache removed: every request runs the handler", a, None)
        return
    if a.shared != b.shared:
        kind = "loosened" if b.shared else "tightened"
        state = "shared by every caller" if b.shared else "kept per caller"
        c.add(kind, "cache.shared", f"cache made {state}", a.shared, b.shared)
    c.sets("cache.vary_headers", a.vary_headers, b.vary_headers, more_is="tightened",
           what="varies by header")
    c.sets("cache.vary_claims", a.vary_claims, b.vary_claims, more_is="tightened",
           what="varies by claim")
    c.scalar("cache.vary_query", a.vary_query, b.vary_query, _flag_off)
    seen = {"shared", "vary_headers", "vary_claims", "vary_query"}
    da, db = _value(a), _value(b)
    for key in dict.fromkeys([*da, *db]):
        if key not in seen:
            _generic(c, f"cache.{key}", da.get(key), db.get(key))


def _roles(c: _Collector, old: RoutePolicy, new: RoutePolicy) -> None:
    a, b = old.roles, new.roles
    if not a and b:
        c.add("tightened", "roles", f"roles required: any of {_shown(b)}", a, b)
    elif a and not b:
        c.add("loosened", "roles", "roles no longer checked", a, b)
    else:
        # any one role suffices: another accepted role lets more callers in
        c.sets("roles", a, b, more_is="loosened", what="role")


def route_changes(
    old: RoutePolicy, new: RoutePolicy, max_ages: tuple[float, float] = (900.0, 900.0)
) -> list[Change]:
    """Every difference between two effective policies of one route."""
    out: list[Change] = []
    for key in RoutePolicy.model_fields:
        if key == "use":
            continue  # a layering detail: its effect shows in the keys it set
        before, after = getattr(old, key), getattr(new, key)
        if before == after:
            continue
        c = _Collector(key)
        if key == "public":
            if after:
                c.add("loosened", "public", "made public: no token, no defaults", before, after)
            else:
                c.add("tightened", "public", "no longer public: a bearer token is required",
                      before, after)
        elif key == "enforce":
            if after:
                c.add("tightened", "enforce", "enforced again (enforce: true)", before, after)
            else:
                c.add("loosened", "enforce",
                      "shadow mode (enforce: false): refusals are logged, not enforced",
                      before, after)
        elif key == "scopes":
            c.sets("scopes", before, after, more_is="tightened", what="scope")
        elif key == "roles":
            _roles(c, old, new)
        elif key == "ip_allowlist":
            _allowlist(c, "ip_allowlist", before, after, none_means="everyone")
        elif key == "mfa":
            _mfa(c, old, new, max_ages)
        elif key == "rate_limit":
            _rate_limits(c, old, new)
        elif key == "credits":
            _credits(c, old, new)
        elif key == "idempotency":
            _idempotency(c, old, new)
        elif key == "cache":
            _cache(c, old, new)
        elif key == "sensitive":
            c.scalar("sensitive", before, after, _flag_off)
        elif key == "encrypt_fields":
            c.sets("encrypt_fields", before, after, more_is="tightened", what="sealed field")
        else:
            _generic(c, key, before, after)
        out.extend(c.out)
    return out


def _issuers(c: _Collector, old: GlobalSettings, new: GlobalSettings) -> None:
    before = {i.issuer: i for i in old.auth.issuers}
    after = {i.issuer: i for i in new.auth.issuers}
    for name in after:
        if name not in before:
            c.add("loosened", "auth.issuers", f"issuer {name} trusted", None, after[name])
    for name, a in before.items():
        b = after.get(name)
        if b is None:
            c.add("tightened", "auth.issuers", f"issuer {name} no longer trusted", a, None)
            continue
        at = f"auth.issuers[{name}]"
        audiences_a = [a.audience] if isinstance(a.audience, str) else a.audience
        audiences_b = [b.audience] if isinstance(b.audience, str) else b.audience
        c.sets(f"{at}.audience", audiences_a, audiences_b, more_is="loosened", what="audience")
        c.sets(f"{at}.algorithms", a.algorithms, b.algorithms, more_is="loosened",
               what="algorithm")
        for key in ("jwks", "secret_env", "jwks_refresh"):
            _generic(c, f"{at}.{key}", getattr(a, key), getattr(b, key))


def settings_changes(old: GlobalSettings, new: GlobalSettings) -> list[Change]:
    """Differences of the `settings` section (they reach every route)."""
    c = _Collector("settings")
    if old == new:
        return []
    _issuers(c, old, new)
    _allowlist(c, "trusted_proxies", old.trusted_proxies or None, new.trusted_proxies or None,
               none_means="no one")
    a, b = old.auth, new.auth
    c.scalar("auth.require_typ", a.require_typ, b.require_typ,
             lambda x, y: y is None if (x is None) != (y is None) else None)
    c.scalar("auth.leeway", a.leeway, b.leeway, _more)
    c.scalar("auth.step_up.max_age", a.step_up.max_age, b.step_up.max_age, _more)
    c.sets("auth.step_up.amr_values", a.step_up.amr_values, b.step_up.amr_values,
           more_is="loosened", what="amr")
    c.sets("auth.step_up.acr_values", a.step_up.acr_values, b.step_up.acr_values,
           more_is="loosened", what="acr")
    c.scalar("auth.totp.max_failures", a.totp.max_failures, b.totp.max_failures, _more)
    c.scalar("auth.totp.drift_steps", a.totp.drift_steps, b.totp.drift_steps, _more)
    done = {"issuers", "require_typ", "leeway", "step_up", "totp"}
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    for key in dict.fromkeys([*da, *db]):
        if key not in done:
            _generic(c, f"auth.{key}", da.get(key), db.get(key))
    for key in ("totp",):
        for sub in ("header", "digits", "window", "lockout", "issuer_name"):
            _generic(c, f"auth.{key}.{sub}", getattr(a.totp, sub), getattr(b.totp, sub))
    _generic(c, "forwarded_header", old.forwarded_header, new.forwarded_header)
    return c.out


def _summary(policy: RoutePolicy) -> str:
    """What a route added or removed does, in a few words."""
    if policy.public:
        said = ["public"]
    else:
        said = ["bearer token"]
        if policy.scopes:
            said.append(f"scopes {_shown(policy.scopes)}")
        if policy.roles:
            said.append(f"roles {_shown(policy.roles)}")
        if policy.mfa:
            said.append("mfa")
    if policy.ip_allowlist is not None:
        said.append(f"ip_allowlist {_shown(policy.ip_allowlist)}")
    if policy.rate_limit:
        said.append(f"{len(policy.rate_limit)} rate limit(s)")
    if policy.credits:
        said.append(f"credits cost {policy.credits.cost}")
    if policy.cache:
        said.append("cache" + (" (shared)" if policy.cache.shared else ""))
    if not policy.enforce:
        said.append("shadow mode")
    return ", ".join(said)


def diff_policies(old: PolicySet | None, new: PolicySet | None) -> PolicyDiff:
    """The differences between two policy sets (None: a side with no policy files)."""
    result = PolicyDiff()
    before = {_ident(e): e for e in (old.routes.values() if old else ())}
    after = {_ident(e): e for e in (new.routes.values() if new else ())}
    if old is not None and new is not None:
        changes = settings_changes(_portable(old), _portable(new))
        if changes:
            result.routes.append(RouteDiff("settings", "changed", "", changes))
    ages = (
        old.settings.auth.step_up.max_age if old else 900.0,
        new.settings.auth.step_up.max_age if new else 900.0,
    )
    for ident in sorted(dict.fromkeys([*after, *before]), key=lambda k: (k[1], k[0])):
        a, b = before.get(ident), after.get(ident)
        if a is None and b is not None:
            change = Change("added", "route", "route", f"route added: {_summary(b.policy)}",
                            None, b.policy.model_dump(mode="json", exclude_defaults=True))
            result.routes.append(RouteDiff(b.key, "added", _where(b), [change]))
        elif b is None and a is not None:
            change = Change("removed", "route", "route",
                            "route removed: an app route here is denied (403 no-policy)",
                            a.policy.model_dump(mode="json", exclude_defaults=True), None)
            result.routes.append(RouteDiff(a.key, "removed", _where(a), [change]))
        elif a is not None and b is not None:
            changes = route_changes(a.policy, b.policy, ages)
            if changes:
                result.routes.append(RouteDiff(b.key, "changed", _where(b), changes))
    return result


def _where(entry: RouteEntry) -> str:
    from .lint import relative

    loc = entry.location
    return f"{relative(loc.file)}:{loc.line}:{loc.column}" if loc.line else relative(loc.file)


def _portable(policies: PolicySet) -> GlobalSettings:
    """The settings with JWKS file paths relative to their policy file again (as written).

    The loader makes them absolute, so one file checked out in two places would differ.
    """
    from ..language._positions import read_docs

    settings = policies.settings
    holder = next(
        (d.file for d in read_docs(policies.files) if ("settings",) in d.kinds), None
    )
    if holder is None:
        return settings
    base = Path(holder).resolve().parent
    issuers = []
    for issuer in settings.auth.issuers:
        jwks = issuer.jwks
        if jwks and not jwks.startswith("https://") and Path(jwks).is_absolute():
            issuer = issuer.model_copy(update={"jwks": os.path.relpath(jwks, base)})
        issuers.append(issuer)
    auth = settings.auth.model_copy(update={"issuers": issuers})
    return settings.model_copy(update={"auth": auth})


# --- reading the two sides ------------------------------------------------------------------


def load_side(paths: Sequence[str | Path]) -> PolicySet | None:
    """A side's policies; None when it has no policy file at all (everything added/removed)."""
    from ..language.loader import policy_files

    existing = [p for p in paths if Path(p).exists()]
    if not existing or not policy_files(existing):
        return None
    return load_policies(*existing)


def _git(cwd: Path, *args: str) -> bytes:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    except OSError as exc:
        raise DiffError(f"cannot run git: {exc.strerror}") from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise DiffError(f"git {' '.join(args)}: {message[-1] if message else 'failed'}")
    return done.stdout


@dataclass(frozen=True, slots=True)
class Checkout:
    """A path as it is at a git revision, written out under `root`."""

    path: Path
    root: Path
    rev: str

    def label(self, location: str) -> str:
        """`REV:file:line:col` for a location inside the checkout."""
        prefix = str(self.root) + os.sep
        return f"{self.rev}:{location[len(prefix):]}" if location.startswith(prefix) else location


@contextmanager
def git_checkout(rev: str, path: str | Path) -> Iterator[Checkout]:
    """`path` (a policy file or directory) as it is at git revision `rev`, in a temp folder."""
    target = Path(path).resolve()
    here = target if target.is_dir() else target.parent
    while not here.exists():
        here = here.parent
    top = Path(_git(here, "rev-parse", "--show-toplevel").decode().strip())
    _git(top, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    relative = target.relative_to(top).as_posix() if target != top else "."
    names = _git(top, "ls-tree", "-r", "--name-only", "-z", rev, "--", relative)
    with tempfile.TemporaryDirectory(prefix="pr-diff-") as folder:
        root = Path(folder)
        for name in filter(None, names.decode().split("\0")):
            out = root / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(_git(top, "show", f"{rev}:{name}"))
        yield Checkout(root / relative, root, rev)


# --- output ---------------------------------------------------------------------------------


def _totals(diff: PolicyDiff) -> str:
    counts = diff.count()
    routes = len([r for r in diff.routes if r.route != "settings"])
    parts = ", ".join(f"{counts[k]} {k}" for k in KINDS)
    return f"{routes} route(s) differ: {parts}"


def render(diff: PolicyDiff, fmt: str) -> str:
    """The diff as text, JSON or GitHub-flavoured markdown."""
    if fmt == "json":
        return json.dumps(
            {"routes": [r.as_dict() for r in diff.routes], "summary": diff.count()}, indent=2
        )
    if fmt == "markdown":
        return _markdown(diff)
    if not diff.routes:
        return "no change to the effective policy of any route"
    lines: list[str] = []
    for route in diff.routes:
        where = f"  ({route.location})" if route.location else ""
        status = f"  [{route.status}]" if route.status != "changed" else ""
        lines.append(f"{route.route}{status}{where}")
        lines.extend(f"  {c.kind:<10} {c.message}" for c in route.changes)
    lines.append(_totals(diff))
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(diff: PolicyDiff) -> str:
    counts = diff.count()
    if not diff.routes:
        return "### Policy diff\n\nNo change to the effective policy of any route."
    head = ", ".join(f"**{counts[k]} {k}**" if counts[k] else f"{counts[k]} {k}" for k in KINDS)
    lines = [
        "### Policy diff",
        "",
        head,
        "",
        "| route | change | key | what |",
        "| --- | --- | --- | --- |",
    ]
    for route in diff.routes:
        for change in route.changes:
            kind = f"**{change.kind}**" if change.kind == "loosened" else change.kind
            lines.append(
                f"| `{_cell(route.route)}` | {kind} | `{_cell(change.path)}` "
                f"| {_cell(change.message)} |"
            )
    return "\n".join(lines)


def parse_kinds(values: Iterable[str]) -> list[str]:
    """`--fail-on loosened,removed` (repeatable) as a checked list."""
    kinds = [k.strip() for v in values for k in v.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise DiffError(f"--fail-on takes {', '.join(KINDS)}; got {', '.join(unknown)}")
    return kinds


def changes_by_key(diff: PolicyDiff) -> Mapping[tuple[str, str], list[Change]]:
    """Changes by (route, path), for tests and tools."""
    out: dict[tuple[str, str], list[Change]] = {}
    for route in diff.routes:
        for change in route.changes:
            out.setdefault((route.route, change.path), []).append(change)
    return out
