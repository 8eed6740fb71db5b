"""A route's compiled chain: the ordered steps that guard it, as data.

`explain` prints its `repr`; `asgi.chain.BoundChain` binds it to a route's metrics and
runs it per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import Location
from .step import Step


@dataclass(frozen=True, slots=True)
class Chain:
    """The ordered steps that guard one METHOD + path template."""

    route: str
    steps: tuple[Step, ...]
    origin: Location | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __repr__(self) -> str:
        lines = [f"{self.route}" + (f"  ({self.origin})" if self.origin else "")]
        lines.extend(f"  note: {n}" for n in self.notes)
        if not self.steps:
            lines.append("  (no steps: the handler runs unguarded)")
        for i, step in enumerate(self.steps, 1):
            detail = step.describe()
            shadow = " [shadow: enforce false]" if not step.enforce else ""
            lines.append(f"  {i}. {step.name}" + (f": {detail}" if detail else "") + shadow)
        return "\n".join(lines)
