"""The step of a route with no policy: deny by default."""

from __future__ import annotations

from ..errors import Denial, Problems
from .step import Context, Step


class DenyStep(Step):
    """Refuse every request: no policy governs this METHOD + path."""

    name = "deny"
    traced = False  # an in-memory check: named on the request span, no span of its own

    def __init__(self, route: str) -> None:
        self.route = route

    async def check(self, ctx: Context) -> None:
        """Always refuse with 403 no-policy."""
        raise Denial(Problems.NO_POLICY, f"no policy governs {self.route}; requests are denied")

    def describe(self) -> str:
        """One line for explain."""
        return "no policy: every request is refused with 403"
