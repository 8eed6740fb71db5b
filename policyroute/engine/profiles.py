"""Resilience profiles on the engine: every compile sees the policy's `resilience:`
profiles, and `@policyroute.resilient` coroutines the installed engine's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..language.loader import PolicySet
from ..resilience import bind
from .engine import Engine, Hook


class Profiles(Hook):
    """Check the profiles of each policy set and hand them to the makers (a ConfigError
    refuses the install or the reload)."""

    def services(
        self, engine: Engine, policies: PolicySet, services: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """`services` plus the profiles of `policies`, made current for `@resilient`."""
        return bind(engine, policies, services)
