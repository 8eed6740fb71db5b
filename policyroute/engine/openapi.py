"""The policy in the app's OpenAPI document: each route's bearer scheme with its scopes, and
the problem responses (401, 402, 403, 409, 413, 415, 422, 429, 503, ...) its steps can answer.

`install` wraps `app.openapi`; the document is rebuilt when the engine's snapshot changes,
so a reload shows in `/openapi.json` (and `/docs`) at once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._types import format_duration
from ..errors import Problems, ProblemType
from ..language.loader import PolicySet
from ..language.policy import RateLimit, RoutePolicy
from ..steps.rate_limit import limit_name, throttle_bound
from .engine import Engine, Hook

if TYPE_CHECKING:
    from fastapi import FastAPI

SCHEME = "bearer"
PROBLEM = "Problem"
PROBLEM_JSON = "application/problem+json"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": PROBLEM,
    "description": "Problem details (RFC 9457); `type` is a stable URI per problem.",
    "type": "object",
    "properties": {
        "type": {"type": "string", "format": "uri-reference"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
    "required": ["type", "title", "status"],
    "additionalProperties": True,
}

_TEXT = {"type": "string"}
HEADERS: dict[str, dict[str, Any]] = {
    "WWW-Authenticate": {"description": "Bearer challenge (RFC 6750).", "schema": _TEXT},
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": _TEXT},
    "RateLimit": {"description": "Remaining quota per limit.", "schema": _TEXT},
    "RateLimit-Policy": {"description": "The limits of this route.", "schema": _TEXT},
}


@dataclass(slots=True)
class Outcome:
    """One status a route's policy can answer with: its problems and headers."""

    status: int
    problems: list[ProblemType] = field(default_factory=list)
    headers: set[str] = field(default_factory=set)

    def add(self, problem: ProblemType, *headers: str) -> None:
        """Add a problem (once) and the headers it carries."""
        if problem not in self.problems:
            self.problems.append(problem)
        self.headers.update(headers)


def outcomes(policy: RoutePolicy | None, policies: PolicySet) -> dict[int, Outcome]:
    """Every problem status the chain of a route can answer, by status."""
    found: dict[int, Outcome] = {}

    def add(problem: ProblemType, *headers: str) -> None:
        found.setdefault(problem.status, Outcome(problem.status)).add(problem, *headers)

    if policy is None:
        add(Problems.NO_POLICY)
        return found
    if policy.ip_allowlist is not None:
        add(Problems.IP_NOT_ALLOWED)
    if not policy.public:
        add(Problems.UNAUTHENTICATED, "WWW-Authenticate")
        add(Problems.INVALID_TOKEN, "WWW-Authenticate")
        add(Problems.INVALID_REQUEST, "WWW-Authenticate")
        issuers = policies.settings.auth.issuers
        if any(i.jwks is not None and i.jwks.startswith("https://") for i in issuers):
            add(Problems.KEYS_UNAVAILABLE, "Retry-After")  # no key set fetched yet
        lockout = policies.settings.auth.lockout
        if lockout is not None:
            add(Problems.AUTH_LOCKED, "Retry-After")
            if lockout.on_backend_error == "closed":
                add(Problems.BACKEND_UNAVAILABLE, "Retry-After")
    if policy.scopes:
        add(Problems.INSUFFICIENT_SCOPE, "WWW-Authenticate")
    if policy.roles:
        add(Problems.FORBIDDEN_ROLE)
    if policy.mfa is not None:
        add(Problems.MFA_REQUIRED, "WWW-Authenticate")
        if "totp" in policy.mfa.methods:
            add(Problems.MFA_INVALID, "WWW-Authenticate")
            add(Problems.MFA_LOCKED, "Retry-After")
            add(Problems.BACKEND_UNAVAILABLE, "Retry-After")
    _body(policy, policies, add)

    if policy.replay is not None:
        add(Problems.TOKEN_REPLAYED, "WWW-Authenticate")
        add(Problems.INVALID_TOKEN, "WWW-Authenticate")  # a token without a jti
        add(Problems.BACKEND_UNAVAILABLE, "Retry-After")
    _state(policy, add)
    _resilience(policy, policies, add)
    return found


Add = Callable[..., None]


def _body(policy: RoutePolicy, policies: PolicySet, add: Add) -> None:
    """413 where the body has a limit (the route's, or the default of a step that reads it
    whole), 415 where its media types are listed."""
    from ..resilience.profiles import effective

    limits = policy.request
    profile = effective(policy, policies.resilience)
    reads = policy.idempotency or policy.encrypt_fields or (profile and profile.retry)
    if (limits is not None and limits.max_body is not None) or reads:
        add(Problems.BODY_TOO_LARGE)
    if limits is not None and limits.content_types:
        add(Problems.UNSUPPORTED_MEDIA_TYPE)
    if policy.encrypt_fields or (policy.events is not None and policy.events.fields.request):
        add(Problems.INVALID_BODY)  # not JSON the step can read


def _state(policy: RoutePolicy, add: Add) -> None:
    closed = False
    for limit in policy.rate_limit:
        concurrency = limit.algorithm == "concurrency"
        problem = Problems.CONCURRENCY_LIMITED if concurrency else Problems.RATE_LIMITED
        add(problem, "Retry-After", "RateLimit", "RateLimit-Policy")
        closed = closed or limit.on_backend_error == "closed"
    if policy.credits is not None:
        add(Problems.INSUFFICIENT_CREDITS)
        closed = closed or policy.credits.on_backend_error == "closed"
    if policy.idempotency is not None:
        if policy.idempotency.required:
            add(Problems.IDEMPOTENCY_KEY_MISSING)
        add(Problems.IDEMPOTENCY_KEY_INVALID)
        add(Problems.IDEMPOTENCY_IN_FLIGHT)
        add(Problems.IDEMPOTENCY_RESPONSE_NOT_KEPT)
        add(Problems.IDEMPOTENCY_KEY_REUSED)
        closed = closed or policy.idempotency.on_backend_error == "closed"
    if policy.cache is not None:
        closed = closed or policy.cache.on_backend_error == "closed"
    if closed:
        add(Problems.BACKEND_UNAVAILABLE)


def _resilience(policy: RoutePolicy, policies: PolicySet, add: Add) -> None:
    from ..resilience.profiles import effective

    found = effective(policy, policies.resilience)
    if found is None:
        return
    if found.breaker is not None:
        add(Problems.CIRCUIT_OPEN, "Retry-After")
    if found.timeout is not None:
        add(Problems.UPSTREAM_TIMEOUT)


def _response(outcome: Outcome) -> dict[str, Any]:
    titles = "; ".join(f"{p.title} ({p.slug})" for p in outcome.problems)
    response: dict[str, Any] = {
        "description": titles,
        "content": {PROBLEM_JSON: {"schema": {"$ref": f"#/components/schemas/{PROBLEM}"}}},
    }
    if outcome.headers:
        response["headers"] = {h: HEADERS[h] for h in sorted(outcome.headers)}
    return response


def _merge_response(responses: dict[str, Any], outcome: Outcome) -> None:
    key = str(outcome.status)
    ours = _response(outcome)
    theirs = responses.get(key)
    if theirs is None:
        responses[key] = ours
        return
    # FastAPI's own 422 (request validation) stays; the problem variant joins it.
    theirs.setdefault("content", {}).update(ours["content"])
    theirs["description"] = f"{theirs.get('description', '')}; {ours['description']}".lstrip("; ")
    if "headers" in ours:
        theirs.setdefault("headers", {}).update(ours["headers"])


def _limit(lim: RateLimit) -> dict[str, Any]:
    out: dict[str, Any] = {"name": limit_name(lim), "key": lim.key, "algorithm": lim.algorithm}
    if lim.capacity is not None:
        out["capacity"] = lim.capacity
    if lim.algorithm == "token_bucket" and lim.capacity is not None:
        out["refill"] = lim.refill or lim.capacity  # tokens added back each `per`
    if lim.per:
        out["per"] = format_duration(lim.per)
    if lim.algorithm == "throttle":
        out["burst"] = lim.burst
        out["max_delay"] = format_duration(throttle_bound(lim))
    if lim.algorithm == "debounce":
        out["on_repeat"] = lim.on_repeat or "refuse"
    return out


def _extension(policy: RoutePolicy, policies: PolicySet) -> dict[str, Any]:
    out: dict[str, Any] = {"public": policy.public}
    if policy.roles:
        out["roles"] = list(policy.roles)
    if policy.mfa is not None:
        out["mfa"] = list(policy.mfa.methods)
    lockout = policies.settings.auth.lockout
    if lockout is not None and not policy.public:
        out["lockout"] = {
            "failures": lockout.failures,
            "per": format_duration(lockout.per),
            "block": format_duration(lockout.block),
        }
    if policy.replay is not None:
        out["replay"] = policy.replay.by
    if policy.credits is not None:
        out["credits"] = policy.credits.cost
    if policy.rate_limit:
        out["rate_limit"] = [_limit(lim) for lim in policy.rate_limit]
    if policy.cache is not None:
        out["cache"] = {"ttl": format_duration(policy.cache.ttl), "shared": policy.cache.shared}
    if policy.idempotency is not None:
        out["idempotency"] = {
            "header": policy.idempotency.header,
            "required": policy.idempotency.required,
        }
    return out


def _idempotency_parameter(operation: dict[str, Any], policy: RoutePolicy) -> None:
    if policy.idempotency is None:
        return
    header = policy.idempotency.header
    params = operation.setdefault("parameters", [])
    if any(p.get("in") == "header" and p.get("name", "").lower() == header for p in params):
        return
    params.append(
        {
            "name": header,
            "in": "header",
            "required": policy.idempotency.required,
            "description": "A unique key per operation: a repeat replays the first response "
            "(draft-ietf-httpapi-idempotency-key-header).",
            "schema": {"type": "string"},
        }
    )


def decorate(doc: dict[str, Any], policies: PolicySet) -> dict[str, Any]:
    """Add each operation's security requirement and problem responses to `doc`."""
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {})[PROBLEM] = copy.deepcopy(PROBLEM_SCHEMA)
    components.setdefault("securitySchemes", {})[SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A bearer JWT; each operation lists the scopes it requires.",
    }
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            if method not in HTTP_METHODS or not isinstance(operation, dict):
                continue
            entry = policies.get(method.upper(), path)
            policy = entry.policy if entry is not None else None
            responses = operation.setdefault("responses", {})
            for outcome in sorted(outcomes(policy, policies).values(), key=lambda o: o.status):
                _merge_response(responses, outcome)
            if policy is None:
                operation["x-policyroute"] = {"policy": None}
                continue
            if not policy.public:
                operation["security"] = [{SCHEME: list(policy.scopes)}]
            _idempotency_parameter(operation, policy)
            operation["x-policyroute"] = _extension(policy, policies)
    return doc


def install(app: FastAPI, engine: Engine) -> None:
    """Wrap `app.openapi` so the document follows the engine's current policy."""
    original = app.openapi
    built: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        snapshot = engine.snapshot
        if built.get("snapshot") is snapshot and app.openapi_schema is not None:
            return app.openapi_schema
        app.openapi_schema = None  # FastAPI caches its document; build it fresh
        doc = decorate(original(), snapshot.policies)
        app.openapi_schema = doc
        built["snapshot"] = snapshot
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


class OpenAPI(Hook):
    """The policy in the app's OpenAPI document, updated on reload."""

    def attach(self, engine: Engine) -> None:
        """Wrap the app's `openapi`."""
        install(engine.app, engine)
