"""`credits`: reserve a route's cost atomically, commit on success, refund on failure."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from starlette.requests import ClientDisconnect

from .._types import format_duration
from ..backends.keys import TagMemo
from ..backends.pipeline import wire
from ..backends.valkey import Arg, ValkeyStore
from ..errors import Denial, Problems, StorageError
from ..language.policy import Credits, RoutePolicy
from ..observability.metrics import backend_error
from ..observability.repeats import backend_warning
from ..observability.shadow import shadow_denial
from .parts import ClientGone, Outcome, Part, Request, Vault, principal_tag
from .slots import reply_text


def hold_keys(store: ValkeyStore, tag: str) -> tuple[str, str, str]:
    """An account's balance key, the key of its open reservations and of those swept."""
    # Each made by the store (remembered there for a caller's next requests).
    return store.key(tag, "credits"), store.key(tag, "credits", "held"), store.key(
        tag, "credits", "swept"
    )


# A running request's hold is renewed every quarter of `hold` (at most every RENEW_MIN s).
RENEW_MIN = 0.05
RENEW = "credits renew"


# What a handler or server raises when the client went away mid-response (Starlette's
# ClientDisconnect under ASGI spec 2.4 servers, whose send raises OSError).
GONE: Final = (asyncio.CancelledError, OSError, ClientGone, ClientDisconnect)
# Read per reservation: bound once (a `Final` name is read directly when compiled).
_monotonic: Final = time.monotonic
_running_loop: Final = asyncio.get_running_loop


class CreditsStep(Part):
    """Refuse with 402 when the balance is short; never overdraw; refund as the policy says."""

    name = "credits"

    def __init__(self, store: ValkeyStore, spec: Credits, *, enforce: bool = True) -> None:
        self.store = store
        self.spec = spec
        # A caller's account keys, made once for its requests (`hold_keys`).
        self.holds: TagMemo[tuple[str, str, str]] = TagMemo(lambda tag: hold_keys(store, tag))
        # Shadow mode reads the balance and never charges (observability/shadow.py).
        self.shadow = not (enforce and spec.enforce)
        self.fail_open = self.shadow or spec.on_backend_error == "open"
        allowance = spec.allowance
        self.peek_args: list[Arg] = [allowance.amount, allowance.every] if allowance else [0, "-"]
        self.hold_ms = max(1, round(spec.hold * 1000))
        self.op: tuple[Arg, ...] = wire(
            (
                "cr",
                spec.cost,
                allowance.amount if allowance else 0,
                allowance.every if allowance else "-",
                self.hold_ms,
            )
        )
        self.refund_on = frozenset(spec.refund_on)
        self.watch_disconnect = "disconnect" in self.refund_on
        self.hears_disconnect = not self.shadow
        # Reservations of requests still running, by token: (held key, member, since); the
        # timer that looks for holds to renew every `every` while there are any, and the
        # task renewing them (see `_due`).
        self.every = max(RENEW_MIN, spec.hold / 4)
        self.live: dict[str, tuple[str, str, float]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_loop: asyncio.AbstractEventLoop | None = None
        self.renewer: asyncio.Task[None] | None = None
        self.route = ""

    def describe(self) -> str:
        """Cost, refunds and allowance in one line."""
        extra = ""
        if self.spec.allowance:
            extra = f", allowance {self.spec.allowance.amount} per {self.spec.allowance.every}"
        if self.shadow:
            return f"cost {self.spec.cost}{extra} (shadow: enforce false; read, never charged)"
        return (
            f"cost {self.spec.cost}, refund on {', '.join(self.spec.refund_on)}{extra}, "
            f"held while the request runs, refunded {format_duration(self.spec.hold)} after "
            "its process stops renewing the hold"
        )

    def prepare(self, req: Request) -> None:
        """Append the reservation op for the caller's account (none for a first-tier hit)."""
        if "answer" in req.data:
            return
        keys = self.holds.get(principal_tag(req.ctx))
        if self.shadow:
            self._probe(req, keys)
            return
        req.op(keys, (*self.op, req.token))
        req.data["cr_keys"] = keys

    def _probe(self, req: Request, keys: tuple[str, str, str]) -> None:
        """Read the balance the next charge would see, beside the script."""
        store, route = self.store, req.ctx.route

        async def evaluate() -> None:
            try:
                balance = await store.run(
                    "credits_peek",
                    keys[:2],
                    self.peek_args,
                    operation="credits shadow",
                    fail_open=True,
                )
            except StorageError as exc:
                backend_error(route, exc)
                backend_warning(route, exc)
                return
            req.data["crs_balance"] = int(balance)

        req.probe(evaluate)

    def _settle_shadow(self, req: Request) -> None:
        balance = req.data.get("crs_balance")
        # A cache hit or a replay would not be charged, so it is never a would-be 402.
        if balance is None or "answer" in req.data or req.data["verdict"] not in ("go", "wait"):
            return
        ctx = req.ctx
        if balance >= self.spec.cost:
            ctx.decide("credits", "shadow_sufficient")
            return
        ctx.decide("credits", "shadow_insufficient")
        detail = f"this request costs {self.spec.cost} credits; the balance is {balance}"
        shadow_denial(ctx, "credits", Denial(Problems.INSUFFICIENT_CREDITS, detail))

    def settle(self, req: Request, reply: list[Any]) -> None:
        """Raise 402 when the balance was short; remember what was taken."""
        if self.shadow:
            self._settle_shadow(req)
            return
        row = reply[2]
        if req.data["verdict"] == "credits":
            req.ctx.decide("credits", "insufficient")
            balance = int(row[2])
            raise Denial(
                Problems.INSUFFICIENT_CREDITS,
                f"this request costs {self.spec.cost} credits; the balance is {balance}",
                extra={"cost": self.spec.cost, "balance": balance},
                headers={k.decode(): v.decode() for k, v in req.extra},
            )
        if row:
            # The reservation's member as the script wrote it: `from_a:from_b:period:token`,
            # the first three as they come in the reply (`%d,%d,%d,%s` there).
            member = ":".join(
                (reply_text(row[0]), reply_text(row[1]), reply_text(row[3]), req.token)
            )
            req.data["cr_taken"] = member
            self._keep(req, member)

    def _keep(self, req: Request, member: str) -> None:
        """Renew this reservation's hold until the request settles it."""
        self.live[req.token] = (req.data["cr_keys"][1], member, _monotonic())
        loop = _running_loop()
        if self.timer is None or self.timer_loop is not loop:
            # A timer, not a task: most requests settle long before it fires, and a request
            # then costs no task made, scheduled and ended (a task each request, before).
            self.route = req.ctx.route
            self.timer_loop = loop
            self.timer = loop.call_later(self.every, self._due)

    def _due(self) -> None:
        """Every `every` while holds are open: renew the holds older than `every`.

        So a request that runs longer than `hold` keeps its reservation: the next charge
        of the account does not sweep (refund) it, and its commit then takes it. The
        renewal is one script call per account; a renewal still running when the next is
        due is not doubled (the next tick finds what is still due).
        """
        self.timer = None
        if not self.live:
            return  # the next reservation starts the timer again
        loop = _running_loop()
        older = _monotonic() - self.every
        due: dict[str, list[Arg]] = {}
        for held, member, since in self.live.values():
            if since <= older:
                due.setdefault(held, [self.hold_ms]).append(member)
        if due and (self.renewer is None or self.renewer.done()):
            self.renewer = loop.create_task(self._renew(due))
        self.timer = loop.call_later(self.every, self._due)

    async def _renew(self, due: dict[str, list[Arg]]) -> None:
        """Renew the holds in `due` (held key: hold ms, then members), one call per account."""
        store, route = self.store, self.route
        calls = [
            store.run("credits_renew", [held], members, operation=RENEW, fail_open=True)
            for held, members in due.items()
        ]
        for failed in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(failed, StorageError):
                # The commit still charges a hold swept meanwhile (finish.lua).
                backend_error(route, failed)
                backend_warning(route, failed)
            elif isinstance(failed, BaseException):
                raise failed

    async def stop(self) -> None:
        """Stop renewing holds (the engine stops; requests still running keep theirs)."""
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()
        renewer, self.renewer = self.renewer, None
        if renewer is not None and not renewer.done():
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    def refund(self, outcome: Outcome) -> bool:
        """Whether the reserved credits go back: no charge without a handler's response."""
        if not outcome.started:
            return True
        # A request the route refused before its endpoint ran (FastAPI's 422 or 400, a
        # dependency's error) is not charged. Only the endpoint answers 2xx, so a 2xx counts
        # as run even if the endpoint could not mark its entry.
        if not outcome.handler_ran and not 200 <= outcome.status < 300:
            return True
        on = self.refund_on
        if not outcome.done:
            # A response cut short: by the client (a server error on send, a cancelled
            # handler, or a streaming response that stopped when told the client left),
            # else by the app. Only what `refund_on` names is refunded.
            error = outcome.error
            gone = isinstance(error, GONE) or (error is None and outcome.gone)
            return ("disconnect" if gone else "error") in on
        status = outcome.status
        return (
            (status >= 500 and "5xx" in on)
            or (400 <= status < 500 and "4xx" in on)
            or (status in (408, 504) and "timeout" in on)
        )

    def after(self, req: Request, outcome: Outcome) -> None:
        """Refund the reservation when the outcome says so (else it is committed)."""
        member: str | None = req.data.get("cr_taken")  # `from_a:from_b:period:token`
        if member is None:
            return
        self.live.pop(req.token, None)
        keys = req.data["cr_keys"]
        ctx = req.ctx
        if self.refund(outcome):
            from_a, from_b, period, token = member.split(":", 3)
            req.finish("ref", keys, int(from_a), int(from_b), period, token)
            ctx.decide("credits", "refunded")
        else:
            req.finish("com", keys, member)
            ctx.decide("credits", "charged")
            if ctx.span is not None:
                ctx.note("credits.charged", self.spec.cost)


def make_credits_part(policy: RoutePolicy, store: ValkeyStore, vault: Vault) -> Part | None:
    """The credits part of a route's fused state step."""
    return CreditsStep(store, policy.credits, enforce=policy.enforce) if policy.credits else None
