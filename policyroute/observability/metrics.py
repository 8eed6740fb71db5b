"""Prometheus metrics of requests and step decisions, bound once per route.

Every label comes from a fixed vocabulary: the route template ("METHOD /template"), the
method, a step name, an outcome or a problem type slug. Never a user id, a token or a raw
path. A `RouteMeter` is made when a route's chain is bound (at install and on reload) and
holds the series an allowed request bumps, so such a request never calls `.labels()`.

All metrics live in prometheus_client's default registry, which `/metrics` serves.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any, Final, cast

from mypy_extensions import mypyc_attr
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import StorageError

_bisect_left: Final = bisect.bisect_left  # per request: bound once


class Tally:
    """One labelled counter series: a plain number bumped on the event loop, no lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (one by default)."""
        self.value += amount


class Timing:
    """One labelled histogram series: per-bucket counts and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count `value` in the first bucket whose bound is at least `value`."""
        self.counts[_bisect_left(self.bounds, value)] += 1
        self.total += value


class Family(Collector):
    """A counter or histogram whose series are `Tally`/`Timing` cells, read at scrape time.

    prometheus_client's own metrics take a lock and check their arguments on every
    increment; a request bumps several series, so the hot path keeps plain cells here
    and the registry turns them into samples only when `/metrics` is read.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...] | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.buckets = buckets
        self.series: dict[tuple[str, ...], Any] = {}
        REGISTRY.register(self)

    def labels(self, *values: str) -> Any:
        """The cell of one label combination (a `Tally`, or a `Timing` for a histogram)."""
        cell = self.series.get(values)
        if cell is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            cell = Tally() if self.buckets is None else Timing(self.buckets)
            self.series[values] = cell
        return cell

    def describe(self) -> Iterator[Metric]:
        """The family with no samples (what the registry checks names against)."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        """The family with a sample per series, as the cells stand now."""
        family = self._family()
        for values, cell in list(self.series.items()):
            if isinstance(family, HistogramMetricFamily):
                bounds = [*(repr(float(b)) for b in cell.bounds), "+Inf"]
                running, buckets = 0, []
                for bound, count in zip(bounds, cell.counts, strict=True):
                    running += count
                    buckets.append((bound, running))
                family.add_metric(list(values), buckets, cell.total)
            else:
                family.add_metric(list(values), cell.value)
        yield family

    def _family(self) -> CounterMetricFamily | HistogramMetricFamily:
        if self.buckets is None:
            return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


REQUESTS: Final = Family(
    "policyroute_requests",
    "Requests through a route's chain by outcome (allowed, denied, error) and status class.",
    ("route", "method", "outcome", "status"),
)
LATENCY: Final = Family(
    "policyroute_request_duration_seconds",
    "Time from the chain's start to the end of the response, per route.",
    ("route", "method"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
DENIALS = Family(
    "policyroute_denials",
    "Requests refused, by the step that refused and the problem type (reason).",
    ("route", "step", "reason"),
)
SHADOW_DENIALS = Family(
    "policyroute_shadow_denials",
    "Requests a step in shadow mode (enforce: false) would have refused but let on.",
    ("route", "step", "reason"),
)
RATE_LIMIT = Family(
    "policyroute_rate_limit_decisions",
    "Rate-limit decisions: allowed, limited, delayed (a throttle made it wait), joined (a "
    "debounce answered it with another request's response), shadow_allowed, shadow_limited, "
    "shadow_delayed, shadow_joined.",
    ("route", "outcome"),
)
THROTTLE_WAIT = Family(
    "policyroute_throttle_wait_seconds",
    "How long requests a throttle delayed waited for their turn.",
    ("route",),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
LOCKOUT = Family(
    "policyroute_lockout_decisions",
    "Brute-force lockout: failure (a failed authentication counted), locked (a failure that "
    "started a block), blocked (refused during a block), busy (refused: as many attempts in "
    "flight as failures allowed), and the same with shadow_ for `enforce: false`.",
    ("route", "outcome"),
)
REPLAY = Family(
    "policyroute_replay_decisions",
    "One-time tokens: first (used now), replayed, no_jti, returned (given back: the request "
    "was refused before its handler), shadow_replayed, shadow_no_jti.",
    ("route", "outcome"),
)
CREDITS = Family(
    "policyroute_credits_decisions",
    "Credit decisions: charged, refunded, insufficient, shadow_sufficient, shadow_insufficient.",
    ("route", "outcome"),
)
CACHE = Family(
    "policyroute_cache_lookups",
    "Response cache lookups: hit, local_hit (in-process tier), miss, wait (another request "
    "was filling the entry), bypass (the request carried credentials the key does not cover).",
    ("route", "outcome"),
)
IDEMPOTENCY = Family(
    "policyroute_idempotency_decisions",
    "Idempotency-Key decisions: new, replay, in_flight, reused.",
    ("route", "outcome"),
)
UNKEPT = Family(
    "policyroute_unkept_responses",
    "Responses a cache entry or an idempotency record did not keep: larger than the step's "
    "max_body.",
    ("route", "step"),
)
BACKEND_ERRORS = Family(
    "policyroute_backend_errors",
    "Policy backend failures seen by a route, and whether the step failed open or closed.",
    ("backend", "route", "outcome"),
)
SLOW = Family(
    "policyroute_slow_handlers",
    "Handler runs that took at least the route's `slow` threshold.",
    ("route",),
)

# kind -> (metric, outcomes): the decisions steps report with `ctx.decide(kind, outcome)`.
DECISIONS: Final[dict[str, tuple[Family, tuple[str, ...]]]] = {
    "rate_limit": (
        RATE_LIMIT,
        (
            "allowed",
            "limited",
            "delayed",
            "joined",
            "shadow_allowed",
            "shadow_limited",
            "shadow_delayed",
            "shadow_joined",
        ),
    ),
    "lockout": (
        LOCKOUT,
        (
            "failure",
            "locked",
            "blocked",
            "busy",
            "shadow_failure",
            "shadow_locked",
            "shadow_blocked",
            "shadow_busy",
        ),
    ),
    "replay": (
        REPLAY,
        ("first", "replayed", "no_jti", "returned", "shadow_replayed", "shadow_no_jti"),
    ),
    "credits": (
        CREDITS,
        ("charged", "refunded", "insufficient", "shadow_sufficient", "shadow_insufficient"),
    ),
    "cache": (CACHE, ("hit", "local_hit", "miss", "wait", "bypass")),
    "idempotency": (IDEMPOTENCY, ("new", "replay", "in_flight", "reused")),
    "unkept": (UNKEPT, ("cache", "idempotency")),
}
OUTCOMES = ("allowed", "denied", "error")
STATUS_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")

# The step a denial came from, by problem type, when an around-step raised it.
STEP_OF_PROBLEM = {
    "no-policy": "deny",
    "ip-not-allowed": "ip_allowlist",
    "client-address-rewritten": "client",
    "method-not-allowed": "gate",
    "header-too-large": "gate",
    "body-too-large": "request",
    "unsupported-media-type": "request",
    "unauthenticated": "auth",
    "invalid-token": "auth",
    "invalid-request": "auth",
    "insufficient-scope": "scopes",
    "forbidden-role": "roles",
    "mfa-required": "mfa",
    "mfa-invalid": "mfa",
    "mfa-locked": "mfa",
    "auth-locked": "auth",
    "token-replayed": "replay",
    "rate-limited": "rate_limit",
    "concurrency-limited": "rate_limit",
    "insufficient-credits": "credits",
    "idempotency-key-missing": "idempotency",
    "idempotency-key-invalid": "idempotency",
    "idempotency-key-reused": "idempotency",
    "idempotency-in-flight": "idempotency",
    "idempotency-response-not-kept": "idempotency",
    "record-unreadable": "idempotency",
    "circuit-open": "resilience",
    "handler-timeout": "resilience",
    "backend-unavailable": "state",
    "invalid-body": "fields",
    "sealed-field": "fields",
}


def status_class(status: int) -> str:
    """`2xx` for 200..299 and so on; `none` when no response started."""
    index = status // 100
    return STATUS_CLASSES[index] if 0 < index < len(STATUS_CLASSES) else "none"


@mypyc_attr(allow_interpreted_subclasses=True)
class RouteMeter:
    """The label children of one route: bound when its chain is bound, never per request."""

    __slots__ = (
        "decisions", "denials", "latency", "method", "ok", "requests", "route", "shadows", "timer"
    )

    def __init__(self, route: str, kinds: frozenset[str] = frozenset()) -> None:
        self.route = route
        self.method = method = route.split(" ", 1)[0]
        # The cells of the usual request (the route's method, allowed, 2xx), held apart.
        self.timer: Timing = LATENCY.labels(route, method)
        self.ok: Tally = REQUESTS.labels(route, method, "allowed", "2xx")
        self.latency: dict[str, Any] = {method: self.timer}
        self.requests: dict[tuple[str, str, str], Any] = {(method, "allowed", "2xx"): self.ok}
        # Typed: the compiled build bumps a decision's `value` as a field, not an attribute.
        self.decisions: dict[tuple[str, str], Tally] = {
            (kind, outcome): DECISIONS[kind][0].labels(route, outcome)
            for kind in kinds
            if kind in DECISIONS
            for outcome in DECISIONS[kind][1]
        }

    def count(self, kind: str, outcome: str) -> None:
        """Count one decision of a step."""
        child = self.decisions.get((kind, outcome))
        if child is None:
            family = DECISIONS.get(kind)
            if family is None or outcome not in family[1]:
                raise ValueError(f"unknown decision {kind}={outcome}")
            child = cast(Tally, family[0].labels(self.route, outcome))
            self.decisions[(kind, outcome)] = child
        child.value += 1.0  # `Tally.inc`, inline: a stateful request counts several

    def done(self, method: str, outcome: str, status: int, seconds: float) -> None:
        """Count a finished request and observe its duration."""
        if 200 <= status < 300 and outcome == "allowed" and method == self.method:
            self.ok.value += 1.0
            usual = self.timer
            usual.counts[_bisect_left(usual.bounds, seconds)] += 1
            usual.total += seconds
            return
        key = (method, outcome, status_class(status))
        child = self.requests.get(key)
        if child is None:
            child = self.requests[key] = REQUESTS.labels(self.route, *key)
        child.inc()
        timer = self.latency.get(method)
        if timer is None:
            timer = self.latency[method] = LATENCY.labels(self.route, method)
        timer.observe(seconds)

    def denied(self, step: str, reason: str) -> None:
        """Count a denial by the step that refused and its problem type."""
        DENIALS.labels(self.route, step, reason).inc()

    def shadow(self, step: str, reason: str) -> None:
        """Count a denial a shadowed step did not enforce."""
        SHADOW_DENIALS.labels(self.route, step, reason).inc()


def backend_error(route: str, exc: StorageError) -> None:
    """Count a backend failure on a route, with whether the step went on (open) or refused."""
    BACKEND_ERRORS.labels(exc.backend, route, "open" if exc.fail_open else "closed").inc()
