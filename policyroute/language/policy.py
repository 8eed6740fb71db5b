"""The policy language: frozen pydantic models for every key of a policy file."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .._types import ByteSize, Duration, HeaderName, Network, Scope, Topic
from ._networks import public_cover

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z_]+))?\}")
_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/{}-]*$")


class Model(BaseModel):
    """Base of every policy model: immutable, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=False)


def _as_list(value: Any) -> Any:
    """Accept one mapping where a list of mappings is expected."""
    return [value] if isinstance(value, dict) else value


def _as_mode(value: Any) -> Any:
    """Accept `required` / `optional` as shorthand for `{mode: ...}`."""
    return {"mode": value} if isinstance(value, str) else value


def _as_bounds(value: Any) -> Any:
    """Accept one duration as shorthand for `{min: it, max: it}` (a fixed interval)."""
    return {"min": value, "max": value} if isinstance(value, str | int | float) else value


OnBackendError = Literal["open", "closed"]
Algorithm = Literal[
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
    "HS256",
    "HS384",
    "HS512",
]
MfaMethod = Literal["step_up", "totp"]
RefundOn = Literal["5xx", "4xx", "timeout", "error", "disconnect"]


class JwksRefresh(Model):
    """When a JWKS URL is fetched again: when its Cache-Control max-age runs out, bounded."""

    min: Duration = Field(
        default=30.0,
        gt=0,
        description="Never fetch sooner than this after the last fetch: a shorter max-age, "
        "no-cache, or a token naming an unknown kid wait for it. After a failed fetch, "
        "retries come after 1s, 2s, 4s... up to this.",
    )
    max: Duration = Field(
        default=600.0,
        gt=0,
        description="Fetch again at the latest this long after the last fetch: without a "
        "max-age, or with a longer one. A key removed from the JWKS is refused by then.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> JwksRefresh:
        if self.max < self.min:
            raise ValueError(f"`max` ({self.max}s) is shorter than `min` ({self.min}s)")
        return self


class Issuer(Model):
    """A trusted token issuer."""

    issuer: str = Field(min_length=1)
    audience: str | list[str]
    jwks: str | None = Field(
        default=None,
        description="An https URL or a file of the issuer's JWKS. A URL is fetched on "
        "first use and again on the `jwks_refresh` schedule; a file is read at startup and "
        "again whenever it changes (checked every second).",
    )
    secret_env: str | None = None
    algorithms: list[Algorithm] = Field(
        default_factory=lambda: list[Algorithm](["RS256"]), min_length=1
    )
    jwks_refresh: Annotated[JwksRefresh, BeforeValidator(_as_bounds)] = Field(
        default=JwksRefresh(),
        description="{min, max} bounds of the refresh of a JWKS URL (default 30s and 10m); "
        "one duration fixes the interval.",
    )

    @model_validator(mode="after")
    def _one_key_source(self) -> Issuer:
        if (self.jwks is None) == (self.secret_env is None):
            raise ValueError("set exactly one of `jwks` (file or https URL) or `secret_env`")
        hmac = [a for a in self.algorithms if a.startswith("HS")]
        if self.secret_env is not None and len(hmac) != len(self.algorithms):
            raise ValueError("`secret_env` keys only verify HS256/HS384/HS512 algorithms")
        if self.jwks is not None and hmac:
            raise ValueError("HMAC algorithms need `secret_env`; a JWKS never verifies HS tokens")
        if self.jwks is not None and self.jwks.startswith("http://"):
            raise ValueError("a JWKS URL must use https")
        return self


class StepUp(Model):
    """What counts as a fresh step-up authentication in the token."""

    acr_values: list[str] = Field(default_factory=list)
    amr_values: list[str] = Field(default_factory=lambda: ["mfa", "otp", "hwk", "swk"])
    max_age: Duration = 900.0


class TotpSettings(Model):
    """How TOTP codes are checked."""

    header: HeaderName = "x-totp-code"
    drift_steps: int = Field(default=1, ge=0, le=1)
    digits: int = Field(default=6, ge=6, le=8)
    max_failures: int = Field(default=5, ge=1)
    window: Duration = 900.0
    lockout: Duration = 900.0
    issuer_name: str = "policyroute"


class Lockout(Model):
    """Brute-force lockout: failed authentications counted per client address and subject."""

    failures: int = Field(
        default=10,
        ge=1,
        description="Failed authentications (a refused token, a wrong or reused one-time "
        "code) within `per` that block: an address for everyone, a subject at the "
        "addresses that failed for it.",
    )
    per: Duration = Field(
        default=300.0, gt=0, description="The sliding window the failures are counted in."
    )
    block: Duration = Field(
        default=900.0,
        gt=0,
        description="How long a block lasts: 429 with Retry-After on every route that needs a "
        "token; a subject stays blocked at new failing addresses while failures go on.",
    )
    on_backend_error: OnBackendError = Field(
        default="open",
        description="open: without Valkey, tokens and codes are checked without counting; "
        "closed: refused with 503.",
    )
    enforce: bool = Field(
        default=True,
        description="false: shadow mode; failures are counted in keys of their own and a "
        "would-be 429 is logged and counted, never answered.",
    )


class AuthSettings(Model):
    """How bearer tokens are verified."""

    issuers: list[Issuer] = Field(default_factory=list)
    scopes_claim: str = Field(
        default="scope",
        description="Claim (dotted path) of the scopes: a string is split on single spaces "
        "(RFC 6749, %x20 only; a tab or another space character is part of a scope), a "
        "list gives its strings.",
    )
    roles_claim: str = "roles"
    leeway: Duration = Field(
        default=30.0,
        description="Clock skew allowed (whole seconds, rounded up): a token is accepted "
        "this long after its exp, and its nbf, iat and auth_time may be this far ahead.",
    )
    max_token_bytes: int = Field(default=8192, ge=256)
    require_typ: str | None = None
    token_cache_size: int = Field(default=10_000, ge=0)
    realm: str = "api"
    step_up: StepUp = StepUp()
    totp: TotpSettings = TotpSettings()
    tenant_claim: str | None = Field(
        default=None,
        min_length=1,
        description="Claim (dotted path) naming the caller's tenant or organization: every "
        "per-principal key (credits, limits, idempotency records, cache entries, TOTP) "
        "includes its value, so one subject of two tenants keeps two sets of state.",
    )
    lockout: Lockout | None = Field(
        default=None,
        description="Brute-force lockout on every route that needs a token, e.g. "
        "{failures: 10, per: 5m, block: 15m}; unset: failures are not counted.",
    )


class GlobalSettings(Model):
    """The `settings` section: at most one file sets it."""

    auth: AuthSettings = AuthSettings()
    trusted_proxies: list[Network] = Field(default_factory=list)
    # One header only: a proxy that appends to X-Forwarded-For passes a client's own
    # Forwarded header through untouched, so reading both would let the client pick its address.
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    api_docs: Literal["public"] | None = Field(
        default=None,
        description="public: FastAPI's own documentation routes (openapi_url, docs_url, "
        "its OAuth2 redirect, redoc_url, where the app serves them) are public routes "
        "without a policy entry each; a route the policy lists keeps its own policy. Unset, "
        "they are app routes like any other: denied unless listed.",
    )

    @model_validator(mode="after")
    def _no_open_proxy(self) -> GlobalSettings:
        everyone = [str(n) for n in self.trusted_proxies if n.prefixlen == 0]
        if everyone:
            raise ValueError(
                f"trusted_proxies {', '.join(everyone)} trusts every address, so any client "
                "could set its own address; list only your proxies' networks"
            )
        for cover in public_cover(self.trusted_proxies):
            if cover.everything:
                entries = [str(n) for n in self.trusted_proxies if n.version == cover.version]
                raise ValueError(
                    f"trusted_proxies {', '.join(entries)} together trust "
                    f"every public IPv{cover.version} address, so any client could set its "
                    "own address; list only your proxies' networks"
                )
        return self


class Mfa(Model):
    """Multi-factor / step-up requirement of a route."""

    mode: Literal["required"] = "required"
    methods: list[MfaMethod] = Field(
        default_factory=lambda: list[MfaMethod](["step_up", "totp"]), min_length=1
    )
    max_age: Duration | None = None
    enforce: bool = Field(
        default=True,
        description="false: shadow mode; a refusal is logged and counted, not enforced "
        "(a one-time code is checked, never used up).",
    )


class RateLimit(Model):
    """One limit: a token bucket, a sliding window, a concurrency cap, a throttle or a debounce."""

    key: str = "user"
    algorithm: Literal["token_bucket", "sliding_window", "concurrency", "throttle", "debounce"] = (
        Field(
            default="token_bucket",
            description="token_bucket, sliding_window and concurrency refuse what is over; "
            "throttle makes requests wait their turn to leave at `capacity` per `per` (429 "
            "past `burst` or `max_delay`); debounce refuses or joins a repeat of the same "
            "request from the same key until the key was quiet for `per`.",
        )
    )
    capacity: int | None = Field(
        default=None,
        ge=1,
        description="Requests per `per` (token_bucket: the bucket's size; throttle: its "
        "steady rate); concurrency: requests in flight. Required except for debounce.",
    )
    refill: int | None = Field(default=None, ge=1)
    per: Duration | None = None
    cost: int = Field(default=1, ge=1)
    on_backend_error: OnBackendError = "open"
    name: str | None = None
    # How long a concurrency slot (or a debounce leader's record) outlives a process that
    # died holding it.
    lease: Duration | None = Field(default=None, gt=0)
    burst: int | None = Field(
        default=None,
        ge=0,
        description="throttle: how many requests beyond the steady rate may wait their turn "
        "(nginx limit_req burst); one more is refused with 429.",
    )
    delay: int | None = Field(
        default=None,
        ge=0,
        description="throttle: how many of the `burst` go at once instead of waiting (nginx "
        "limit_req delay=); 0 unless set, at most `burst`.",
    )
    max_delay: Duration | None = Field(
        default=None,
        gt=0,
        description="throttle: the longest a request may wait; one that would wait longer is "
        "refused with 429 (the queue bounds it in any case: burst / rate).",
    )
    on_repeat: Literal["refuse", "join"] | None = Field(
        default=None,
        description="debounce: refuse (429 with Retry-After, the default) or join (answer "
        "with the response of the request that opened the window, once it has one).",
    )
    enforce: bool = Field(
        default=True,
        description="false: shadow mode; counted in a bucket of its own, a would-be 429 is "
        "logged and counted, not enforced (a throttle never delays, a debounce never joins).",
    )

    @model_validator(mode="after")
    def _shape(self) -> RateLimit:
        if not re.match(
            r"^(user|ip|api_key|route|claim:[A-Za-z0-9_.:-]+|header:[A-Za-z0-9-]+)$", self.key
        ):
            raise ValueError(
                f"invalid limit key {self.key!r}: use user, ip, api_key, route, "
                "claim:NAME or header:NAME"
            )
        algorithm = self.algorithm
        if algorithm != "throttle":
            extra = [k for k in ("burst", "delay", "max_delay") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"`{'`, `'.join(extra)}` applies to throttle limits only")
        if algorithm != "debounce" and self.on_repeat is not None:
            raise ValueError("`on_repeat` applies to debounce limits only")
        if algorithm == "debounce":
            self._debounce_shape()
            return self
        if self.capacity is None:
            raise ValueError(f"a {algorithm} limit needs a `capacity`")
        if algorithm == "concurrency":
            if self.per is not None or self.refill is not None:
                raise ValueError("a concurrency limit takes `capacity` only, not `per` or `refill`")
        elif self.lease is not None:
            raise ValueError("`lease` applies to concurrency and debounce limits only")
        elif self.per is None or self.per <= 0:
            raise ValueError(f"a {algorithm} limit needs a positive `per` duration")
        if algorithm == "throttle":
            self._throttle_shape()
        if self.cost > self.capacity:
            raise ValueError(f"cost {self.cost} exceeds capacity {self.capacity}: never allowed")
        return self

    def _throttle_shape(self) -> None:
        if self.refill is not None:
            raise ValueError("a throttle takes `capacity` per `per` as its rate, not `refill`")
        if self.burst is None:
            raise ValueError(
                "a throttle needs `burst`: how many requests may wait their turn (0: none)"
            )
        if self.delay is not None and self.delay > self.burst:
            raise ValueError(f"`delay` ({self.delay}) exceeds `burst` ({self.burst})")

    def _debounce_shape(self) -> None:
        if self.per is None or self.per <= 0:
            raise ValueError("a debounce needs a positive `per`: the quiet window")
        wrong = [k for k in ("capacity", "refill") if getattr(self, k) is not None]
        if wrong or self.cost != 1:
            wrong += ["cost"] if self.cost != 1 else []
            raise ValueError(
                f"a debounce lets one request through per quiet window: drop `{'`, `'.join(wrong)}`"
            )
        if self.lease is not None and self.on_repeat != "join":
            raise ValueError("`lease` of a debounce applies to `on_repeat: join` only")


class Allowance(Model):
    """A periodic credit allowance that resets the balance."""

    amount: int = Field(ge=1)
    every: Literal["hour", "day", "week", "month"] = "month"


class Credits(Model):
    """Credit cost of a route."""

    cost: int = Field(ge=1)
    refund_on: list[RefundOn] = Field(
        default_factory=lambda: list[RefundOn](["5xx", "timeout", "error"])
    )
    on_backend_error: OnBackendError = "closed"
    allowance: Allowance | None = None
    # A reservation no response ever settled (its process died) is refunded after this.
    hold: Duration = Field(default=900.0, gt=0)
    enforce: bool = Field(
        default=True,
        description="false: shadow mode; the balance is read, never charged, a would-be 402 "
        "is logged and counted.",
    )


class Idempotency(Model):
    """Idempotency-Key handling of a route."""

    header: HeaderName = "idempotency-key"
    ttl: Duration = 86400.0
    required: bool = False
    on_backend_error: OnBackendError = "closed"
    # How long an in-flight record outlives a process that died (default: ttl, at most 5m).
    lock: Duration | None = Field(default=None, gt=0)
    max_body: ByteSize = Field(
        default=1 << 20,
        description="Largest response body a record keeps (default 1MiB). A larger response "
        "is streamed to the client and not kept: its record says so, a repeat of the key "
        "answers 409 idempotency-response-not-kept (with the first response's status) "
        "instead of running again, and policyroute_unkept_responses_total counts it.",
    )


class LocalCache(Model):
    """An optional in-process first cache tier."""

    max_entries: int = Field(default=1024, ge=1)
    eviction: Literal["lru", "lfu", "fifo"] = "lru"
    ttl: Duration | None = None


class Cache(Model):
    """Response cache of a route."""

    ttl: Duration
    shared: bool = False
    acknowledge_shared: bool = False
    vary_headers: list[HeaderName] = Field(default_factory=list)
    vary_claims: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Token claims (dotted paths) the response depends on, e.g. org_id: "
        "callers whose values differ never share an entry.",
    )
    vary_query: bool = True
    ignore_credentials: bool = Field(
        default=False,
        description="true: the handler's answer never depends on Authorization, Cookie or "
        "X-Api-Key, so requests carrying them are cached like any other. Otherwise such a "
        "request bypasses the cache (never answered from it, never stored) unless the key "
        "covers the header: a bearer token the route verified, or a header in vary_headers.",
    )
    local: LocalCache | None = None
    on_backend_error: OnBackendError = "open"
    # How long the first miss may take before waiters run the handler too
    # (default: ten times the ttl, at most 10s).
    lock: Duration | None = Field(default=None, gt=0)
    max_body: ByteSize = Field(
        default=1 << 20,
        description="Largest response body the cache stores (default 1MiB). A larger "
        "response is streamed to the client and not stored (the next request is a miss "
        "again); policyroute_unkept_responses_total counts it.",
    )


_EXCEPTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
RETRY_CONDITIONS = ("5xx", "timeout")


def _exception_name(name: str) -> str:
    """A builtin or dotted exception name, checked for shape (resolved at compile time)."""
    if not _EXCEPTION_NAME.match(name):
        raise ValueError(
            f"invalid exception name {name!r}: use a builtin name (ConnectionError) or a "
            "dotted import path (httpx.ConnectError)"
        )
    return name


class Retry(Model):
    """Retries around the handler."""

    attempts: int = Field(default=3, ge=1, le=20)
    backoff: Literal["exponential", "fixed"] = "exponential"
    initial: Duration = 0.1
    max: Duration = 2.0
    jitter: bool = True
    deadline: Duration | None = None
    on: list[str] = Field(
        default_factory=lambda: ["5xx", "timeout"],
        description="5xx, timeout, and exception names (builtin or dotted import paths).",
    )

    @model_validator(mode="after")
    def _shape(self) -> Retry:
        for item in self.on:
            if item not in RETRY_CONDITIONS and len(item) == 3 and item.endswith("xx"):
                raise ValueError(f"`on: {item}` is not allowed: only 5xx responses are retried")
            if item not in RETRY_CONDITIONS:
                _exception_name(item)
        if self.max < self.initial:
            raise ValueError(f"`max` ({self.max}s) is shorter than `initial` ({self.initial}s)")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError("`deadline` must be a positive duration")
        return self

    @property
    def exceptions(self) -> list[str]:
        """The exception names of `on` (everything but 5xx and timeout)."""
        return [item for item in self.on if item not in RETRY_CONDITIONS]


class Breaker(Model):
    """Circuit breaker around the handler."""

    failures: int = Field(default=5, ge=1)
    reset: Duration = 30.0
    success_threshold: int = Field(default=1, ge=1)
    half_open_calls: int = Field(default=1, ge=1)
    exclude: list[str] = Field(
        default_factory=list,
        description="Exception names that never count as failures (builtin or dotted paths).",
    )
    shared: bool = False

    @model_validator(mode="after")
    def _shape(self) -> Breaker:
        for item in self.exclude:
            _exception_name(item)
        if self.reset <= 0:
            raise ValueError("`reset` must be a positive duration")
        return self


_FIELD_PATHS = (
    "Object keys joined by dots: `order.amount` is the `amount` of the `order` object, "
    'never a top-level key spelled "order.amount"; absent fields are left out.'
)


class EventFields(Model):
    """Which request and response JSON fields go into the event."""

    request: list[str] = Field(default_factory=list, description=_FIELD_PATHS)
    response: list[str] = Field(default_factory=list, description=_FIELD_PATHS)


class Events(Model):
    """Where a route's events are published."""

    topic: Topic
    dlq: Topic | None = None
    fields: EventFields = EventFields()
    max_attempts: int = Field(default=5, ge=1)


_MEDIA_RANGE = re.compile(r"^[a-z0-9!#$&^_.+-]+/([a-z0-9!#$&^_.+-]+|\*)$")


def _media_range(value: Any) -> Any:
    """A media type (`application/json`) or a range of subtypes (`text/*`), lower-cased."""
    if not isinstance(value, str) or not _MEDIA_RANGE.match(value.strip().lower()):
        raise ValueError(
            f"invalid media type {value!r}: write a type/subtype without parameters, "
            "e.g. application/json, or type/* for every subtype"
        )
    return value.strip().lower()


MediaRange = Annotated[str, BeforeValidator(_media_range)]


class RequestLimits(Model):
    """What a route accepts of a request body, checked before any step or handler reads it."""

    max_body: ByteSize | None = Field(
        default=None,
        description="Largest request body: a larger Content-Length is answered 413 "
        "(body-too-large) before anything is read, and a body sent without one is refused "
        "(413) as soon as it grows past this, while it streams. Also the most a step that "
        "reads the whole body (idempotency, encrypt_fields, retry) reads. Unset: no limit "
        "for the handler, and such steps read at most POLICYROUTE_MAX_BODY (1MiB).",
    )
    content_types: list[MediaRange] = Field(
        default_factory=list,
        description="Media types a request with a body may have (application/json, or "
        "type/* for every subtype); any other Content-Type, or none, is answered 415 "
        "(unsupported-media-type). Empty: any.",
    )


class Resilience(Model):
    """A named resilience profile: retry, breaker and timeout."""

    retry: Retry | None = None
    breaker: Breaker | None = None
    timeout: Duration | None = None

    @model_validator(mode="after")
    def _positive_timeout(self) -> Resilience:
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("`timeout` must be a positive duration")
        return self


def _as_replay(value: Any) -> Any:
    """Accept `jti` as shorthand for `{by: jti}`."""
    return {"by": value} if isinstance(value, str) else value


class Replay(Model):
    """One-time tokens: a token's identifier is accepted once on the route, until it expires."""

    by: Literal["jti"] = Field(
        default="jti",
        description="jti: the token's `jti` claim (RFC 7519) is accepted once per issuer, "
        "until the token's exp (plus the leeway); a token without one is refused.",
    )
    enforce: bool = Field(
        default=True,
        description="false: shadow mode; identifiers are recorded in keys of their own and a "
        "would-be refusal is logged and counted, never answered.",
    )


RouteKeyName = Literal[
    "use",
    "public",
    "enforce",
    "request",
    "scopes",
    "roles",
    "ip_allowlist",
    "mfa",
    "replay",
    "rate_limit",
    "credits",
    "idempotency",
    "cache",
    "retry",
    "breaker",
    "timeout",
    "resilience",
    "events",
    "sensitive",
    "encrypt_fields",
    "decrypt_fields",
    "slow",
]


class RoutePolicy(Model):
    """Every key a route (or a default, or a profile) may set."""

    use: list[str] = Field(default_factory=list)
    public: bool = False
    enforce: bool = Field(
        default=True,
        description="false: shadow mode for the whole route; guards, limits and credits "
        "record what they would refuse and let the request on.",
    )
    scopes: list[Scope] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)
    ip_allowlist: list[Network] | None = None
    request: RequestLimits | None = None
    mfa: Annotated[Mfa | None, BeforeValidator(_as_mode)] = None
    replay: Annotated[Replay | None, BeforeValidator(_as_replay)] = Field(
        default=None,
        description="`jti`: one-time tokens; each token's jti is accepted once on the "
        "routes that set it, across workers; a token without one is refused.",
    )
    rate_limit: Annotated[list[RateLimit], BeforeValidator(_as_list)] = Field(default_factory=list)
    credits: Credits | None = None
    idempotency: Idempotency | None = None
    cache: Cache | None = None
    retry: Retry | None = None
    breaker: Breaker | None = None
    timeout: Duration | None = None
    resilience: str | None = None
    events: Events | None = None
    sensitive: bool = False
    encrypt_fields: list[str] = Field(default_factory=list)
    decrypt_fields: list[str] = Field(default_factory=list)
    slow: Duration | None = None

    @model_validator(mode="after")
    def _holds_outlive_the_handler(self) -> RoutePolicy:
        if self.credits and self.timeout and self.credits.hold <= self.timeout:
            raise ValueError(
                f"credits.hold ({self.credits.hold}s) must exceed the route's timeout "
                f"({self.timeout}s), or a running request's reservation would be refunded"
            )
        return self

    @model_validator(mode="after")
    def _one_debounce(self) -> RoutePolicy:
        debounces = [lim for lim in self.rate_limit if lim.algorithm == "debounce"]
        if len(debounces) > 1:
            raise ValueError("a route takes at most one debounce limit")
        if debounces and debounces[0].on_repeat == "join":
            other = [k for k in ("cache", "idempotency") if getattr(self, k) is not None]
            if other:
                raise ValueError(
                    f"a debounce that joins already answers repeats with a stored response; "
                    f"drop `{'` or `'.join(other)}` or use `on_repeat: refuse`"
                )
        return self

    @model_validator(mode="after")
    def _public_has_no_identity(self) -> RoutePolicy:
        if self.public:
            identity = [k for k in ("scopes", "roles") if getattr(self, k)]
            identity += ["mfa"] if self.mfa else []
            identity += ["replay"] if self.replay else []
            if identity:
                raise ValueError(
                    f"a public route cannot require {', '.join(identity)}: "
                    "remove `public: true` or the identity keys"
                )
        return self


class PolicyFile(Model):
    """One policy file as written."""

    version: Literal[1]
    settings: GlobalSettings | None = None
    defaults: RoutePolicy | None = None
    profiles: dict[str, RoutePolicy] = Field(default_factory=dict)
    resilience: dict[str, Resilience] = Field(default_factory=dict)
    routes: dict[str, RoutePolicy] = Field(default_factory=dict)


def parse_route_key(key: str) -> tuple[str, str]:
    """Split `METHOD /path/{param}` into a checked method and path; raise ValueError if bad."""
    parts = key.split()
    if len(parts) != 2:
        raise ValueError(f"route key {key!r} must be 'METHOD /path', e.g. 'GET /user/{{user_id}}'")
    method, path = parts
    if method not in METHODS:
        upper = method.upper()
        hint = f"; did you mean {upper!r}?" if upper in METHODS else ""
        raise ValueError(f"unknown HTTP method {method!r} (use one of {', '.join(METHODS)}){hint}")
    if path.startswith("//"):
        _check_host(path)
    if not _PATH.match(path) or "?" in path or "#" in path:
        raise ValueError(f"invalid path {path!r}: a path template starts with '/' and has no query")
    stripped = _PARAM.sub("", path)
    if "{" in stripped or "}" in stripped:
        raise ValueError(f"invalid path template {path!r}: parameters look like {{name}}")
    names = [m.group(1) for m in _PARAM.finditer(path)]
    if len(names) != len(set(names)):
        raise ValueError(f"path template {path!r} repeats a parameter name")
    return method, path


# One label of a host template: a DNS label, a `{param}`, or a label with params in it.
_HOST_LABEL = re.compile(r"^(?!-)(?:[a-z0-9-]|\{[A-Za-z_][A-Za-z0-9_]*\})+(?<!-)$")


def _check_host(path: str) -> None:
    """A host route key, `//host/path`: a lower-case host template, then a path from `/`."""
    host, slash, rest = path[2:].partition("/")
    example = "e.g. 'GET //admin.example.com/reports'"
    if not host:
        raise ValueError(f"invalid host route {path!r}: name the host after '//', {example}")
    if not slash:
        raise ValueError(
            f"invalid host route {path!r}: the host's path follows it from '/' "
            f"('{path}/' for its root), {example}"
        )
    if ":" in host and "{" not in host.split(":", 1)[1]:
        raise ValueError(
            f"invalid host route {path!r}: a host route matches the name without the port; "
            f"drop ':{host.split(':', 1)[1]}'"
        )
    if host != host.lower():
        raise ValueError(
            f"invalid host route {path!r}: the Host header is compared as clients send it, "
            f"in lower case; "
            f"write '//{host.lower()}/{rest}'"
        )
    if not all(_HOST_LABEL.match(label) for label in host.split(".")):
        raise ValueError(
            f"invalid host route {path!r}: {host!r} is not a host name (dot-separated "
            f"labels of letters, digits and '-', or {{param}} parts)"
        )


def normalize_path(path: str) -> str:
    """A template with converters dropped, so `/a/{id:int}` matches `/a/{id}`."""
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", path)
