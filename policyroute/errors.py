"""One error hierarchy: configuration errors, request denials and backend failures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PROBLEM_BASE = "urn:policyroute:problem:"


class PolicyrouteError(Exception):
    """Base of every error this package raises on purpose."""


@dataclass(frozen=True, slots=True)
class Location:
    """A position in a policy file: 1-based line and column."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.column}"
        return self.file


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem in the policy files, with where it is and how bad it is."""

    code: str
    message: str
    location: Location
    key_path: tuple[str | int, ...] = ()
    severity: str = "error"

    @property
    def dotted_path(self) -> str:
        """The key path as `routes.POST /io-job.rate_limit[0].per`."""
        out = ""
        for part in self.key_path:
            if isinstance(part, int):
                out += f"[{part}]"
            else:
                out += ("." if out else "") + part
        return out

    def __str__(self) -> str:
        where = f" (at {self.dotted_path})" if self.key_path else ""
        return f"{self.location}: {self.severity}[{self.code}] {self.message}{where}"


class ConfigError(PolicyrouteError):
    """The policy files are invalid; carries every finding at error level."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings: tuple[Finding, ...] = tuple(findings)
        super().__init__("\n".join(str(f) for f in self.findings))


@dataclass(frozen=True, slots=True)
class ProblemType:
    """A stable RFC 9457 problem type: URI suffix, title and HTTP status."""

    slug: str
    title: str
    status: int

    @property
    def uri(self) -> str:
        """The stable `type` URI of this problem."""
        return PROBLEM_BASE + self.slug


class Problems:
    """The catalogue of problem types every denial uses."""

    NO_POLICY = ProblemType("no-policy", "No policy governs this route", 403)
    METHOD_NOT_ALLOWED = ProblemType("method-not-allowed", "Method not allowed", 405)
    IP_NOT_ALLOWED = ProblemType("ip-not-allowed", "Client address not allowed", 403)
    CLIENT_ADDRESS_REWRITTEN = ProblemType(
        "client-address-rewritten", "The server rewrote the client address", 403
    )
    UNAUTHENTICATED = ProblemType("unauthenticated", "Authentication required", 401)
    INVALID_TOKEN = ProblemType("invalid-token", "Invalid bearer token", 401)
    INVALID_REQUEST = ProblemType("invalid-request", "Malformed authentication request", 400)
    INSUFFICIENT_SCOPE = ProblemType("insufficient-scope", "Insufficient scope", 403)
    FORBIDDEN_ROLE = ProblemType("forbidden-role", "Required role missing", 403)
    MFA_REQUIRED = ProblemType("mfa-required", "Step-up authentication required", 401)
    MFA_INVALID = ProblemType("mfa-invalid", "Invalid one-time code", 401)
    MFA_LOCKED = ProblemType("mfa-locked", "Too many failed one-time codes", 429)
    AUTH_LOCKED = ProblemType("auth-locked", "Too many failed authentications", 429)
    TOKEN_REPLAYED = ProblemType("token-replayed", "One-time token already used", 401)
    RATE_LIMITED = ProblemType("rate-limited", "Too many requests", 429)
    CONCURRENCY_LIMITED = ProblemType("concurrency-limited", "Too many requests in flight", 429)
    INSUFFICIENT_CREDITS = ProblemType("insufficient-credits", "Insufficient credits", 402)
    IDEMPOTENCY_KEY_MISSING = ProblemType(
        "idempotency-key-missing", "Idempotency-Key header required", 400
    )
    IDEMPOTENCY_KEY_INVALID = ProblemType(
        "idempotency-key-invalid", "Malformed Idempotency-Key header", 400
    )
    IDEMPOTENCY_KEY_REUSED = ProblemType(
        "idempotency-key-reused", "Idempotency-Key reused with a different request", 422
    )
    IDEMPOTENCY_IN_FLIGHT = ProblemType(
        "idempotency-in-flight", "A request with this Idempotency-Key is in progress", 409
    )
    IDEMPOTENCY_RESPONSE_NOT_KEPT = ProblemType(
        "idempotency-response-not-kept",
        "The request with this Idempotency-Key completed; its response was too large to keep",
        409,
    )
    CIRCUIT_OPEN = ProblemType("circuit-open", "Service temporarily unavailable", 503)
    BACKEND_UNAVAILABLE = ProblemType("backend-unavailable", "A policy backend is unavailable", 503)
    KEYS_UNAVAILABLE = ProblemType(
        "keys-unavailable", "The token issuer's keys cannot be obtained", 503
    )
    HEADER_TOO_LARGE = ProblemType("header-too-large", "Request header too large", 431)
    BODY_TOO_LARGE = ProblemType("body-too-large", "Request body too large", 413)
    UNSUPPORTED_MEDIA_TYPE = ProblemType("unsupported-media-type", "Unsupported media type", 415)
    UPSTREAM_TIMEOUT = ProblemType("handler-timeout", "The handler did not finish in time", 504)
    RECORD_UNREADABLE = ProblemType("record-unreadable", "A stored record cannot be read", 500)
    INVALID_BODY = ProblemType("invalid-body", "The request body is not the JSON expected", 400)
    SEALED_FIELD = ProblemType("sealed-field", "A sealed field cannot be decrypted", 500)


class Denial(PolicyrouteError):  # noqa: N818 - a denial is an outcome, not a failure
    """A request refused by a step; rendered as RFC 9457 problem+json."""

    def __init__(
        self,
        problem: ProblemType,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        self.problem = problem
        self.detail = detail
        self.status = status or problem.status
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, Any] = dict(extra or {})
        super().__init__(f"{self.status} {problem.slug}: {detail}")

    def body(self, instance: str | None = None) -> dict[str, Any]:
        """The problem document (RFC 9457) for this denial."""
        doc: dict[str, Any] = {
            "type": self.problem.uri,
            "title": self.problem.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            doc["instance"] = instance
        doc.update(self.extra)
        return doc


@dataclass(slots=True)
class StorageError(PolicyrouteError):
    """A backend (Valkey or Pulsar) failed; says which and how the step behaved."""

    backend: str
    operation: str
    fail_open: bool
    cause: BaseException | None = field(default=None)

    def __str__(self) -> str:
        mode = "failed open" if self.fail_open else "failed closed"
        return f"{self.backend} error during {self.operation} ({mode}): {self.cause!r}"


class UsageError(PolicyrouteError):
    """The command line is wrong (exit 2)."""
