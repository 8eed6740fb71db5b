"""Lint policy files (and optionally an app's routes) into findings; render them.

Every rule has a stable code, a severity and a message that says how to fix what it
found. Schema errors come from the loader (`unknown-key`, `invalid-value`, ...); the
rules here look at what the schema cannot: how keys combine, how routes meet the app,
and what is written in the files.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.routing import BaseRoute

from .._types import format_size
from ..asgi.api_docs import with_api_docs
from ..asgi.coverage import no_policy_finding, unmatched_entries, unpolicied
from ..asgi.gate import Endpoint, endpoints
from ..compile.compiler import no_issuer_findings, unenforced
from ..errors import ConfigError, Finding, Location
from ..language._networks import WIDE_PREFIX, IPNetwork, public_cover
from ..language._positions import Doc, KeyPath, read_docs
from ..language.loader import Partial, PolicySet, RouteEntry, load_partial, policy_files
from ..language.policy import normalize_path
from ..resilience import lint_findings as resilience_findings
from ..steps.rate_limit import client_chosen, throttle_bound

FORMATS = ("text", "json", "sarif", "github")


@dataclass(frozen=True, slots=True)
class Rule:
    """A lint rule: its stable code, its severity and what it catches."""

    code: str
    severity: str
    summary: str


RULES: Mapping[str, Rule] = {
    r.code: r
    for r in (
        Rule("no-policy", "error", "An app route has no policy, so every request is denied."),
        Rule(
            "unknown-route",
            "error",
            "An app route is of a type policyroute does not know, so every request is denied.",
        ),
        Rule("unmatched-policy", "error", "A policy names no route of the app."),
        Rule(
            "websocket-response-state",
            "error",
            "cache or idempotency on a websocket route, which has no response to store: "
            "each session would take the stampede lock or the record, and concurrent "
            "sessions would wait on it or be refused.",
        ),
        Rule("not-enforced", "error", "A policy key this version cannot enforce."),
        Rule("retry-unsafe", "error", "An unsafe method is retried without idempotency."),
        Rule(
            "shared-cache-authenticated",
            "error",
            "A cache on an authenticated route does not vary by caller.",
        ),
        Rule(
            "credits-without-idempotency",
            "warning",
            "A POST route charges credits without idempotency, so a client retry pays twice.",
        ),
        Rule(
            "open-trusted-proxies",
            "error",
            "trusted_proxies trust every address (or, together, every public one), so any "
            "client can choose its own address.",
        ),
        Rule(
            "wide-trusted-proxies",
            "warning",
            "trusted_proxies trust more public addresses than a /16 holds; each can choose "
            "its own client address.",
        ),
        Rule(
            "user-limit-on-public-route",
            "error",
            "A limit keyed by user on a public route, where no caller has a user.",
        ),
        Rule(
            "client-chosen-key",
            "warning",
            "A limit keyed by a header the client picks, beside a limit the client cannot "
            "escape.",
        ),
        Rule(
            "client-chosen-limit",
            "error",
            "A limit keyed by api_key (no API key is verified), or a route whose every "
            "enforced limit is keyed by a header the client picks.",
        ),
        Rule(
            "content-types-exclude-json",
            "error",
            "encrypt_fields on a route whose request.content_types admits no JSON body.",
        ),
        Rule(
            "large-buffered-body",
            "warning",
            "A request.max_body over 16MiB on a route whose steps read the whole body.",
        ),
        Rule(
            "lockout-short-block",
            "warning",
            "A brute-force lockout whose block is shorter than its window, so an address "
            "gets `failures` guesses per block, more than the window promises.",
        ),
        Rule(
            "replay-blocks-idempotent-retry",
            "warning",
            "A route of one-time tokens with idempotency: a retry with the same token is "
            "refused before its stored response can be replayed.",
        ),
        Rule(
            "throttle-long-delay",
            "warning",
            "A throttle that may hold a request longer than clients and proxies wait.",
        ),
        Rule(
            "debounce-join-shared",
            "error",
            "A debounce that joins repeats by a key callers share on an authenticated route, "
            "so one caller is answered with another's response.",
        ),
        Rule(
            "no-issuer",
            "error",
            "A route needs a verified bearer token, but settings.auth names no issuer.",
        ),
        Rule("unused-profile", "warning", "A profile that no route uses."),
        Rule("inline-secret", "error", "A secret written inline in a policy file."),
    )
}


def lint(paths: Sequence[str | Path], app: FastAPI | None = None) -> list[Finding]:
    """Every finding for the policy files (and the app, when given), in file order.

    A schema error hides nothing else: a route that failed validation is reported and
    skipped, and the rules run on every route that validated. The app's routes are
    checked when every file could be read (else which routes have a policy is unknown).
    """
    try:
        files = policy_files(paths or ("policies",))
    except ConfigError as exc:
        return list(exc.findings)
    docs = read_docs(files)
    raw = file_findings(docs)
    try:
        loaded = load_partial(*paths)
    except ConfigError as exc:
        return _ordered([*_without_repeats(exc.findings, raw), *raw])
    policies = loaded.policies
    ruled = _of_app(policy_findings(policies, docs), policies, app)
    findings = [*_without_repeats(loaded.findings, raw), *raw, *_known(ruled, loaded)]
    if app is not None and loaded.complete:
        documented = with_api_docs(policies, app)  # settings.api_docs: FastAPI's own routes
        findings.extend(app_findings(documented, app, broken=loaded.invalid_routes))
    return _ordered(findings)


def _known(findings: Iterable[Finding], loaded: Partial) -> list[Finding]:
    """Drop rule findings that only stem from a part that failed validation (reported)."""
    auth_unknown = ("settings", "auth") in loaded.invalid
    profiles_unknown = ("resilience",) in loaded.invalid

    def guessed(f: Finding) -> bool:
        if f.code == "no-issuer":
            return auth_unknown  # the issuers may be there, in settings that did not validate
        if f.code != "unknown-resilience-profile":
            return False
        return profiles_unknown or f.key_path in loaded.invalid  # `@resilient(NAME)`

    return [f for f in findings if not guessed(f)]


def reload_findings(policies: PolicySet) -> list[Finding]:
    """What a reload checks before compiling: every rule that needs no app."""
    docs = read_docs(policies.files)
    # `@resilient` names in code are checked again as the reload binds its profiles.
    found = _of_app(policy_findings(policies, docs), policies, None)
    return _ordered([*file_findings(docs), *found])


def _of_app(findings: list[Finding], policies: PolicySet, app: FastAPI | None) -> list[Finding]:
    """Drop findings about code (`@resilient` names) that is not part of the linted app.

    Declarations are collected from every module this process imported; without an app
    none of them is the policy's concern, and with one only those in its package are.
    """
    files = set(policies.files)
    roots = _app_roots(app) if app is not None else []

    def ours(f: Finding) -> bool:
        if f.key_path[:1] != ("resilience",) or f.location.file in files:
            return True
        where = Path(f.location.file)
        return any(where == root or root in where.parents for root in roots)

    return [f for f in findings if ours(f)]


def _app_roots(app: FastAPI) -> list[Path]:
    """The directories (packages) of the modules that define the app's endpoints."""
    roots: set[Path] = set()
    for found in endpoints(app.router):
        name = getattr(getattr(found.route, "endpoint", None), "__module__", None) or ""
        top = sys.modules.get(name.split(".")[0])
        file = getattr(top, "__file__", None)
        if file and not name.startswith(("fastapi.", "starlette.")):
            roots.add(Path(file).resolve().parent)
    return sorted(roots)


def _ordered(findings: Iterable[Finding]) -> list[Finding]:
    unique = list(dict.fromkeys(findings))
    return sorted(unique, key=lambda f: (f.location.file, f.location.line, f.location.column))


def _without_repeats(loaded: Iterable[Finding], raw: Sequence[Finding]) -> list[Finding]:
    """Loader findings, minus those a raw rule already reports better (open proxies)."""
    if not any(f.code == "open-trusted-proxies" for f in raw):
        return list(loaded)
    return [
        f
        for f in loaded
        if "trusted_proxies" not in f.key_path and "trusted_proxies" not in f.message
    ]


# --- rules on the merged policies -----------------------------------------------------


def policy_findings(policies: PolicySet, docs: Sequence[Doc] = ()) -> list[Finding]:
    """Rules on the merged policy of each route, and on profiles."""
    where = _Locator(docs)
    findings: list[Finding] = []
    for entry in policies.routes.values():
        for key in unenforced(entry.policy):
            findings.append(
                _finding(
                    "not-enforced",
                    f"{entry.key} sets `{key}`, which this version cannot enforce; install "
                    "would refuse to start. Remove the key or upgrade policyroute",
                    where(entry, key),
                    ("routes", entry.key, key),
                )
            )
        findings.extend(_shared_cache(entry, where))
        findings.extend(_credits_without_idempotency(entry, where))
        findings.extend(_user_limit_on_public_route(entry, where))
        findings.extend(_client_chosen_keys(entry, where))
        findings.extend(_request_limits(entry, where))

        findings.extend(_replay_with_idempotency(entry, where))
        findings.extend(_throttle_delays(entry, where))
        findings.extend(_debounce_joins(entry, where))
    findings.extend(_no_issuer(policies))
    findings.extend(_lockout_block(policies, docs))
    findings.extend(_unused_profiles(policies))
    findings.extend(resilience_findings(policies))
    return findings


def _finding(code: str, message: str, location: Location, path: KeyPath) -> Finding:
    return Finding(code, message, location, path, RULES[code].severity)


def _no_issuer(policies: PolicySet) -> list[Finding]:
    """What install refuses as `no-issuer`, once per route, at the key that needs a token."""
    return [
        _finding(f.code, f.message, f.location, f.key_path) for f in no_issuer_findings(policies)
    ]


def _shared_cache(entry: RouteEntry, where: _Locator) -> list[Finding]:
    cache = entry.policy.cache
    if cache is None or not cache.shared or entry.policy.public or cache.acknowledge_shared:
        return []
    return [
        _finding(
            "shared-cache-authenticated",
            f"{entry.key} caches one response for every caller of an authenticated route; "
            "one user's data could be served to another. Remove `shared: true`, or set "
            "`acknowledge_shared: true` if the response really is the same for everyone",
            where(entry, "cache"),
            ("routes", entry.key, "cache", "shared"),
        )
    ]


def _credits_without_idempotency(entry: RouteEntry, where: _Locator) -> list[Finding]:
    policy = entry.policy
    if entry.method != "POST" or policy.credits is None or policy.idempotency is not None:
        return []
    return [
        _finding(
            "credits-without-idempotency",
            f"{entry.key} charges {policy.credits.cost} credit(s) per POST without "
            "`idempotency`: a client that retries after a lost response pays again. Add "
            "`idempotency: {required: true}` so a repeat with the same Idempotency-Key "
            "replays the first response without a second charge",
            where(entry, "credits"),
            ("routes", entry.key, "credits"),
        )
    ]


def _user_limit_on_public_route(entry: RouteEntry, where: _Locator) -> list[Finding]:
    if not entry.policy.public:
        return []
    out = []
    for i, limit in enumerate(entry.policy.rate_limit):
        if limit.key == "user" or limit.key.startswith("claim:"):
            out.append(
                _finding(
                    "user-limit-on-public-route",
                    f"{entry.key} is public, so no caller has a user or claims: this limit "
                    f"keyed by `{limit.key}` falls back to the client address. Write "
                    "`key: ip` to say so, or remove `public: true` to require a token",
                    where(entry, "rate_limit", i, "key"),
                    ("routes", entry.key, "rate_limit", i, "key"),
                )
            )
    return out


def _client_chosen_keys(entry: RouteEntry, where: _Locator) -> list[Finding]:
    """Limits whose bucket the request names (`api_key`, `header:NAME`).

    `api_key` is always an error: its name promises a verified key, and policyroute
    authenticates none. A `header:` limit is a warning beside an enforced limit keyed by
    something the client cannot pick (`user`, `claim:`, `ip`, `route`), which still holds
    every caller; without one the route's abuse protection is only what the client
    chooses, and it is an error.
    """
    limits = entry.policy.rate_limit
    held = any(lim.enforce and not client_chosen(lim.key) for lim in limits)
    out = []
    for i, limit in enumerate(limits):
        at = (where(entry, "rate_limit", i, "key"), ("routes", entry.key, "rate_limit", i, "key"))
        if limit.key == "api_key":
            message = (
                f"{entry.key} limits by `api_key`, but policyroute verifies no API key: the "
                "bucket is whatever the client sends in X-API-Key, so a new value per request "
                "is a new bucket and another caller's value spends theirs. Key the limit by "
                "what a token proves (`user`, or `claim:client_id` for the calling "
                "application) or by `ip`"
            )
            out.append(_finding("client-chosen-limit", message, *at))
        elif client_chosen(limit.key):
            header = limit.key.partition(":")[2]
            why = (
                f"{entry.key} limits by `{limit.key}`, a value the client picks: a new "
                f"{header} per request is a new bucket, and sending another caller's value "
                "spends theirs."
            )
            if held:
                message = (
                    f"{why} The route's other limit still holds every caller; key this one "
                    "by `claim:NAME` when the value is in the token"
                )
                out.append(_finding("client-chosen-key", message, *at))
            else:
                message = (
                    f"{why} No other enforced limit of the route holds a caller who changes "
                    "it: add a limit by `user` or `ip` beside it, or key it by `claim:NAME` "
                    "when the value is in the token"
                )
                out.append(_finding("client-chosen-limit", message, *at))
    return out


# A step that reads a request body whole holds it in memory until the handler has it.
LARGE_BUFFER = 16 << 20


def _admits_json(media: str) -> bool:
    return media in ("application/json", "application/*") or media.endswith("+json")


def _request_limits(entry: RouteEntry, where: _Locator) -> list[Finding]:
    policy = entry.policy
    limits = policy.request
    if limits is None:
        return []
    out = []
    types = limits.content_types
    if policy.encrypt_fields and types and not any(_admits_json(t) for t in types):
        out.append(
            _finding(
                "content-types-exclude-json",
                f"{entry.key} seals request fields (encrypt_fields), which takes a JSON "
                f"body, but request.content_types ({', '.join(types)}) refuses every JSON "
                "body with 415. Add application/json, or remove encrypt_fields",
                where(entry, "request", "content_types"),
                ("routes", entry.key, "request", "content_types"),
            )
        )
    readers = [k for k in ("idempotency", "encrypt_fields", "retry") if getattr(policy, k)]
    if limits.max_body is not None and limits.max_body > LARGE_BUFFER and readers:
        out.append(
            _finding(
                "large-buffered-body",
                f"{entry.key} takes request bodies up to {format_size(limits.max_body)}, and "
                f"{', '.join(readers)} read(s) the whole body before the handler runs: each "
                "such request holds it in memory. Keep max_body small here, and take large "
                "uploads on a route without those keys, where they stream to the handler",
                where(entry, "request", "max_body"),
                ("routes", entry.key, "request", "max_body"),
            )
        )
    return out


# Clients and proxies commonly give up after 30 to 60 s; a request still waiting then runs
# for nobody when its turn comes.
THROTTLE_DELAY_LIMIT = 30.0


def _lockout_block(policies: PolicySet, docs: Sequence[Doc]) -> list[Finding]:
    lockout = policies.settings.auth.lockout
    if lockout is None or lockout.block >= lockout.per:
        return []
    base = ("settings", "auth", "lockout")
    doc = next((d for d in docs if base in d.kinds), None)
    where = Location("<settings>")
    if doc is not None:
        mark = doc.mark((*base, "block")) or doc.mark(base)
        where = Location(doc.file, *mark) if mark else Location(doc.file)
    guesses = lockout.failures * math.ceil(lockout.per / lockout.block)
    return [
        _finding(
            "lockout-short-block",
            f"settings.auth.lockout blocks for {lockout.block:g}s after {lockout.failures} "
            f"failures in {lockout.per:g}s: the count starts again when the block ends, so one "
            f"address gets {guesses} guesses per {lockout.per:g}s, not {lockout.failures}. "
            "Make `block` at least `per`",
            where,
            (*base, "block"),
        )
    ]


def _replay_with_idempotency(entry: RouteEntry, where: _Locator) -> list[Finding]:
    policy = entry.policy
    if policy.replay is None or policy.idempotency is None or not policy.replay.enforce:
        return []
    return [
        _finding(
            "replay-blocks-idempotent-retry",
            f"{entry.key} takes one-time tokens (`replay: jti`) and an {policy.idempotency.header}"
            ": a client that retries after a lost response with the same token is refused "
            "(401 token-replayed) before the stored response is replayed. Clients must retry "
            "with a new token and the same key; if they cannot, drop `replay`",
            where(entry, "replay"),
            ("routes", entry.key, "replay"),
        )
    ]


def _throttle_delays(entry: RouteEntry, where: _Locator) -> list[Finding]:
    out = []
    for i, limit in enumerate(entry.policy.rate_limit):
        if limit.algorithm != "throttle" or not limit.enforce:
            continue
        bound = throttle_bound(limit)
        if bound <= THROTTLE_DELAY_LIMIT:
            continue
        out.append(
            _finding(
                "throttle-long-delay",
                f"{entry.key} throttles to {limit.capacity} per {limit.per:g}s with "
                f"{limit.burst} waiting: a request may wait {bound:g}s for its turn, longer "
                f"than clients and proxies commonly wait ({THROTTLE_DELAY_LIMIT:g}s), and one "
                "they gave up on still runs when its turn comes. Lower `burst` or set "
                f"`max_delay` to {THROTTLE_DELAY_LIMIT:g}s or less",
                where(entry, "rate_limit", i),
                ("routes", entry.key, "rate_limit", i),
            )
        )
    return out


def _debounce_joins(entry: RouteEntry, where: _Locator) -> list[Finding]:
    if entry.policy.public:
        return []
    out = []
    for i, limit in enumerate(entry.policy.rate_limit):
        if limit.on_repeat != "join" or limit.key == "user" or limit.key.startswith("claim:"):
            continue
        out.append(
            _finding(
                "debounce-join-shared",
                f"{entry.key} joins repeats by `{limit.key}`, which different callers share: "
                "a caller repeating another's request within the window is answered with "
                "the other's response. Key the debounce by `user` (or a `claim:` that "
                "identifies the caller)",
                where(entry, "rate_limit", i, "key"),
                ("routes", entry.key, "rate_limit", i, "key"),
            )
        )
    return out


def _unused_profiles(policies: PolicySet) -> list[Finding]:
    return [
        _finding(
            "unused-profile",
            f"profile {name!r} is used by no route: name it in a route's `use:` list, or delete it",
            policies.profiles[name],
            ("profiles", name),
        )
        for name, count in policies.profile_uses.items()
        if count == 0 and name in policies.profiles
    ]


class _Locator:
    """The file position of a route's key (or a value inside it) in the layer that set it."""

    _LAYERS = ("defaults", "profile ", "route")

    def __init__(self, docs: Sequence[Doc]) -> None:
        self.docs = {d.file: d for d in docs}

    def __call__(self, entry: RouteEntry, key: str, *sub: str | int) -> Location:
        sources = entry.origins.get(key)
        if not sources:
            return entry.location
        source = sources[-1]
        doc = self.docs.get(source.location.file)
        if doc is None or not sub:
            return source.location
        layer = layer_path(source.label, entry.key)
        base = (*layer, key)
        if sub and isinstance(sub[0], int) and doc.kinds.get(base) == "map":
            sub = sub[1:]  # one mapping written where a list is expected
        mark = doc.mark((*base, *sub))
        return Location(doc.file, *mark) if mark else source.location


def layer_path(label: str, route_key: str) -> KeyPath:
    """Where a layer lives in its file, from a Source label."""
    if label == "defaults":
        return ("defaults",)
    if label.startswith("profile "):
        return ("profiles", label.removeprefix("profile "))
    return ("routes", route_key)


# --- rules on the app's routes ----------------------------------------------------------


def app_findings(
    policies: PolicySet, app: FastAPI, broken: Collection[tuple[str, str]] = frozenset()
) -> list[Finding]:
    """App routes without a policy, and policies that name no app route.

    `broken` are the METHOD + template of policies that failed validation: their app
    routes have a policy (reported where it is written), not none.
    """
    findings: list[Finding] = []
    found = list(endpoints(app.router))
    for endpoint in found:
        if not endpoint.known:
            findings.append(
                _finding(
                    "unknown-route",
                    f"app route {endpoint.path} is a {type(endpoint.route).__name__}, a route "
                    "type policyroute does not know: every request to it is denied with 403",
                    _source_of(endpoint.route),
                    (),
                )
            )
            continue
        if endpoint.kind == "websocket":
            findings.extend(_websocket_response_state(policies, endpoint))
        for method in unpolicied(endpoint, policies):
            if _written(broken, method, endpoint.path):
                continue
            name = f"{method} {endpoint.path}"
            findings.append(
                _finding(
                    "no-policy", no_policy_finding(name).message, _source_of(endpoint.route), ()
                )
            )
    findings.extend(
        _finding(
            "unmatched-policy",
            f"policy {entry.key} matches no route of the app: check the method and the path "
            "template against the app's routes, or delete the policy",
            entry.location,
            ("routes", entry.key),
        )
        for entry in unmatched_entries(policies, found)
    )
    return findings


def _websocket_response_state(policies: PolicySet, endpoint: Endpoint) -> list[Finding]:
    """`cache` and `idempotency` on the policy of a websocket route (its key is GET)."""
    entry = policies.get("GET", endpoint.path)
    if entry is None:
        return []
    return [
        _finding(
            "websocket-response-state",
            f"{entry.key} is a websocket route: `{key}` stores an HTTP response, and a "
            "websocket session has none. Each session would hold the "
            + (
                "stampede lock, so concurrent sessions wait on each other"
                if key == "cache"
                else "record, so another session with the same key meanwhile is refused (409)"
            )
            + f"; remove `{key}` from this route",
            entry.location,
            ("routes", entry.key, key),
        )
        for key in ("cache", "idempotency")
        if getattr(entry.policy, key) is not None
    ]


def _written(broken: Collection[tuple[str, str]], method: str, path: str) -> bool:
    """Whether a policy that failed validation names METHOD + path (HEAD as GET)."""
    norm = normalize_path(path)
    return (method, norm) in broken or (method == "HEAD" and ("GET", norm) in broken)


def _source_of(route: BaseRoute) -> Location:
    """Where a route's endpoint is declared (its decorator line), else `<app>`."""
    target = getattr(route, "endpoint", None) or getattr(route, "app", None)
    try:
        file = inspect.getsourcefile(target)  # type: ignore[arg-type]
        _, line = inspect.getsourcelines(target)  # type: ignore[arg-type]
    except (TypeError, OSError):
        return Location("<app>")
    if file is None:
        return Location("<app>")
    return Location(relative(file), max(line, 1), 1)


def relative(file: str) -> str:
    """A path relative to the working directory when it lies below it."""
    path = Path(file)
    if not path.is_absolute():
        return file
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return file


# --- rules on the files as written ------------------------------------------------------

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_REFERENCE = re.compile(r"^\$\{?[A-Za-z_][A-Za-z0-9_]*\}?$")
_SECRET_KEY = re.compile(
    r"(?i)^(?:.*[_-])?(?:secret|password|passwd|pwd|passphrase|token|api[_-]?key|"
    r"private[_-]?key|client[_-]?secret|access[_-]?key|secret[_-]?key|credentials?)$"
)
_SECRET_SHAPES = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a PEM private key"),
    (re.compile(r"^eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*$"), "a JWT"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), "a GitHub token"),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), "a Slack token"),
    (re.compile(r"\bsk_(?:live|test)_[A-Za-z0-9]{16,}"), "a Stripe key"),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), "a Google API key"),
)
_KEYLIKE = re.compile(r"^[A-Za-z0-9+/=_-]{32,}$")
_JWK_PRIVATE = ("d", "p", "q", "dp", "dq", "qi", "k")
_OPEN = ("*", "any", "all")


def file_findings(docs: Sequence[Doc]) -> list[Finding]:
    """Rules on the files as written: inline secrets and proxies that trust everyone."""
    findings: list[Finding] = []
    for doc in docs:
        findings.extend(_open_proxies(doc))
        findings.extend(_inline_secrets(doc))
    return findings


def _at(doc: Doc, path: KeyPath) -> Location:
    mark = doc.mark(path)
    return Location(doc.file, *mark) if mark else Location(doc.file, 1, 1)


def _open_proxies(doc: Doc) -> list[Finding]:
    out = []
    base = ("settings", "trusted_proxies")
    entries: list[tuple[str, IPNetwork]] = []
    open_versions: set[int] = set()
    for path, value in doc.scalars.items():
        if path[:2] != base or len(path) > 3:
            continue
        network = _network(value)
        if network is not None:
            entries.append((value.strip(), network))
        if value.strip().lower() in _OPEN or _prefix_zero(value):
            open_versions |= {4, 6} if network is None else {network.version}
            out.append(
                _finding(
                    "open-trusted-proxies",
                    f"trusted_proxies entry {value.strip()!r} trusts every address, so any "
                    "client can send X-Forwarded-For or Forwarded and choose its own address "
                    "(defeating ip_allowlist and per-address limits). List only your proxies' "
                    "networks, e.g. 10.0.0.0/8",
                    _at(doc, path),
                    path,
                )
            )
    for cover in public_cover(n for _, n in entries):
        if cover.version in open_versions:
            continue  # reported at its /0 entry
        written = ", ".join(text for text, n in entries if n.version == cover.version)
        if cover.everything:
            out.append(
                _finding(
                    "open-trusted-proxies",
                    f"trusted_proxies {written} together trust every public "
                    f"IPv{cover.version} address, so any client can send X-Forwarded-For or "
                    "Forwarded and choose its own address (defeating ip_allowlist and "
                    "per-address limits). List only your proxies' networks, e.g. 10.0.0.0/8",
                    _at(doc, base),
                    base,
                )
            )
        elif cover.wide:
            out.append(
                _finding(
                    "wide-trusted-proxies",
                    f"trusted_proxies {written} trust {cover.addresses:,} public "
                    f"IPv{cover.version} addresses, more than a /{WIDE_PREFIX} holds (in "
                    f"{', '.join(map(str, cover.networks))}): a client at any of them can "
                    "choose its own address. Keep them only if nothing but your proxies "
                    "lives there (a CDN's published ranges); else list narrower networks",
                    _at(doc, base),
                    base,
                )
            )
    return out


def _network(value: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        return None


def _prefix_zero(value: str) -> bool:
    network = _network(value)
    return network is not None and network.prefixlen == 0


def _inline_secrets(doc: Doc) -> list[Finding]:
    out = []
    for path, value in doc.scalars.items():
        kind = _secret_kind(path, value)
        if kind is not None:
            out.append(_secret_finding(doc, path, kind))
    for path, kind in doc.kinds.items():
        if kind != "map" or (*path, "kty") not in doc.scalars:
            continue
        if any((*path, m) in doc.scalars for m in _JWK_PRIVATE):
            out.append(_secret_finding(doc, path, "a private JWK"))
    return out


def _secret_finding(doc: Doc, path: KeyPath, kind: str) -> Finding:
    # The message never repeats the value: lint output ends up in CI logs.
    return _finding(
        "inline-secret",
        f"this value looks like {kind} written into the policy file, which is committed "
        "and widely read. Move it out (HS256 keys: `secret_env: VARIABLE_NAME`; JWKS: a "
        "file path or https URL of the public keys), and rotate the secret",
        _at(doc, path),
        path,
    )


def _secret_kind(path: KeyPath, value: str) -> str | None:
    text = value.strip()
    if not text:
        return None
    key = str(path[-1]) if path and isinstance(path[-1], str) else ""
    if key == "secret_env":
        if not _ENV_NAME.match(text) or _random_looking(text):
            return "a secret in `secret_env`, which names an environment variable"
        return None
    if key == "jwks" and text.startswith("{"):
        return "an inline JWK set" if '"d"' in text or '"k"' in text else None
    for pattern, kind in _SECRET_SHAPES:
        if pattern.search(text):
            return kind
    if _SECRET_KEY.match(key) and not _ENV_REFERENCE.match(text):
        return f"a secret (key `{key}`)"
    if any(_random_looking(part) for part in re.split(r"[:,\s]", text)):
        return "a key or token (a long random string)"
    return None


def _random_looking(text: str) -> bool:
    """A long string of key characters with the spread of random bytes (not a name)."""
    if not _KEYLIKE.match(text):
        return False
    classes = sum(
        1 for probe in (str.islower, str.isupper, str.isdigit) if any(probe(c) for c in text)
    )
    if classes < 3:
        return False
    counts = Counter(text)
    entropy = -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())
    return entropy >= 4.0


# --- output -----------------------------------------------------------------------------


def render(findings: Sequence[Finding], fmt: str) -> str:
    """Findings as text, json, sarif or github annotations."""
    if fmt == "json":
        return json.dumps([_as_dict(f) for f in findings], indent=2)
    if fmt == "sarif":
        return json.dumps(sarif(findings), indent=2)
    if fmt == "github":
        return "\n".join(_github(f) for f in findings)
    return "\n".join(str(f) for f in findings)


def _as_dict(f: Finding) -> dict[str, Any]:
    return {
        "file": f.location.file,
        "line": f.location.line,
        "column": f.location.column,
        "severity": f.severity,
        "code": f.code,
        "message": f.message,
        "path": f.dotted_path,
    }


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _github(f: Finding) -> str:
    """One workflow command (`::error file=...,line=...::message`)."""
    level = "error" if f.severity == "error" else "warning"
    props = []
    if not f.location.file.startswith("<"):
        props.append(f"file={_escape_property(relative(f.location.file))}")
        if f.location.line:
            props.append(f"line={f.location.line}")
            props.append(f"col={max(f.location.column, 1)}")
    props.append(f"title={_escape_property(f.code)}")
    where = f" (at {f.dotted_path})" if f.key_path else ""
    return f"::{level} {','.join(props)}::{_escape_data(f.message + where)}"


def _sarif_rule(code: str, severity: str) -> dict[str, Any]:
    rule = RULES.get(code)
    summary = rule.summary if rule else f"Policy schema check: {code}."
    level = "error" if (rule.severity if rule else severity) == "error" else "warning"
    return {
        "id": code,
        "name": "".join(part.capitalize() for part in code.split("-")),
        "shortDescription": {"text": summary},
        "defaultConfiguration": {"level": level},
    }


def sarif(findings: Sequence[Finding]) -> dict[str, Any]:
    """A SARIF 2.1.0 log (for GitHub code scanning upload)."""
    codes = sorted({f.code for f in findings})
    index = {code: i for i, code in enumerate(codes)}
    severities = {f.code: f.severity for f in findings}
    results = []
    for f in findings:
        result: dict[str, Any] = {
            "ruleId": f.code,
            "ruleIndex": index[f.code],
            "level": "error" if f.severity == "error" else "warning",
            "message": {"text": f.message},
        }
        if not f.location.file.startswith("<"):
            uri = relative(f.location.file)
            artifact: dict[str, Any] = {"uri": Path(uri).as_posix()}
            if not Path(uri).is_absolute():
                artifact["uriBaseId"] = "%SRCROOT%"
            result["locations"] = [
                {
                    "physicalLocation": {
                        "artifactLocation": artifact,
                        "region": {
                            "startLine": max(f.location.line, 1),
                            "startColumn": max(f.location.column, 1),
                        },
                    }
                }
            ]
        if f.key_path:
            result["properties"] = {"keyPath": f.dotted_path}
        results.append(result)
    return {
        "version": "2.1.0",
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "policyroute",
                        "version": _version(),
                        "rules": [_sarif_rule(c, severities[c]) for c in codes],
                    }
                },
                "results": results,
            }
        ],
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("policyroute")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"
