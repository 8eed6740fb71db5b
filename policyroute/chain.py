"""A route's compiled chain: data built once, folded once, run per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from ._problem import send_problem
from .errors import Denial, Location
from .steps.base import Context, Handler, Step


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
            lines.append(f"  {i}. {step.name}" + (f": {detail}" if detail else ""))
        return "\n".join(lines)


async def _innermost(ctx: Context) -> None:
    await ctx.app(ctx.scope, ctx.receive, ctx.send)


def _fold(steps: Sequence[Step]) -> Handler:
    handler: Handler = _innermost
    for step in reversed(steps):
        handler = _wrap(step, handler)
    return handler


def _wrap(step: Step, call_next: Handler) -> Handler:
    around = step.around

    async def run(ctx: Context) -> None:
        await around(ctx, call_next)

    return run


class BoundChain:
    """Guards in order, then the around-steps folded over the route's own app."""

    __slots__ = ("chain", "guards", "handler")

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.guards = tuple(s.check for s in chain.steps if s.guard)
        self.handler = _fold([s for s in chain.steps if not s.guard])

    async def __call__(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        """Run the chain for one request, then (if allowed) `app`."""
        ctx = Context(scope, receive, send, self.chain.route, app)
        try:
            for check in self.guards:
                await check(ctx)
            await self.handler(ctx)
        except Denial as denial:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": denial.problem.slug})
                return
            await send_problem(
                send, denial, instance=scope.get("path"), head=scope["method"] == "HEAD"
            )
