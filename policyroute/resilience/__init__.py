"""Resilience: circuit breakers (pybreaker, optionally shared through Valkey), retries
(tenacity) and timeouts, for routes (`retry`, `breaker`, `timeout`, `resilience` keys) and
for any coroutine (`@policyroute.resilient("name")`).
"""

from __future__ import annotations

from .breaker import CircuitOpen, LocalBreaker, SharedBreaker
from .guard import Guard, Spec
from .profiles import Registry, bind, lint_findings, resilient, with_profiles
from .retry import AttemptTimeout, RetryPlan, ServerError

__all__ = [
    "AttemptTimeout",
    "CircuitOpen",
    "Guard",
    "LocalBreaker",
    "Registry",
    "RetryPlan",
    "ServerError",
    "SharedBreaker",
    "Spec",
    "bind",
    "lint_findings",
    "resilient",
    "with_profiles",
]
