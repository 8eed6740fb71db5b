"""Prometheus metrics of breakers and retries (labels: route template or profile name)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

STATE_VALUES = {"closed": 0, "half-open": 1, "open": 2}

BREAKER_STATE = Gauge(
    "policyroute_breaker_state",
    "Circuit breaker state as this process last saw it (0 closed, 1 half-open, 2 open).",
    ["breaker"],
)
BREAKER_TRANSITIONS = Counter(
    "policyroute_breaker_transitions_total",
    "Circuit breaker state changes made by this process.",
    ["breaker", "from_state", "to_state"],
)
RETRIES = Counter(
    "policyroute_retries_total",
    "Retry activity: retry (an extra attempt), recovered, exhausted, deadline.",
    ["target", "outcome"],
)
