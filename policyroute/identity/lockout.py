"""Brute-force lockout (`settings.auth.lockout`): failed authentications, per address and subject.

A failure is a bearer token refused as invalid (bad signature, expired, wrong audience, a
one-time token used again...) or a wrong or reused one-time code. Each counts for the
client address and, when the attempt names one, for the subject: the verified token's
account for a code, the account the token claims (before it is verified) for a token.
No API keys are counted: policyroute verifies none.

- `failures` failures from one address within `per` block that address for `block`: every
  request from it that needs a token is answered 429 (Retry-After) before its token is
  looked at.
- `failures` failures for one subject within `per`, from any addresses, make the subject
  *hot* for `block` (kept hot while failures go on): the addresses that failed for it in
  the window are blocked for it, and while it is hot an address that fails for it is
  blocked for it at once, and may have one attempt for it in flight at a time.
- A subject is never blocked at an address that did not fail for it: someone else's
  failures, from other addresses, never lock its owner out where the owner is.

The trade-off: an attacker with many addresses gets `failures` guesses at a subject, then
one more per new address while it is hot (a per-subject lock everywhere would stop them,
and would let anyone lock any user out). One-time codes keep their own per-account lock
(`totp.max_failures`), which needs the account's own token to trip.

Attempts are counted while in flight: however many arrive at once, at most `failures` are
evaluated from one address before its block (one more is answered 429 at once). All
counting is on Valkey time, in `lua/lockout.lua`; on a cluster the address side and the
subject side are separate calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .._ids import IDS
from .._types import format_duration
from ..backends.valkey import Arg, Store
from ..compile.step import Context
from ..errors import Denial, Problems, ProblemType, StorageError
from ..language.policy import Lockout
from ..observability.metrics import backend_error
from ..observability.repeats import backend_warning
from ..observability.shadow import shadow_denial
from ..principal import address_tag, subject_tag

log = logging.getLogger("policyroute.auth")

# How long an attempt in flight counts when its process died before settling it.
ATTEMPT_LEASE_MS = 10_000
FREE, BLOCKED, BUSY = 0, 1, 2


def _ints(reply: Any) -> tuple[int, int, int]:
    code, ms, marked = (int(x) for x in reply)
    return code, ms, marked


@dataclass(slots=True)
class Attempt:
    """One authentication attempt being evaluated: settle it as failed or done, once."""

    guard: LockoutGuard | None
    ctx: Context
    account: str | None
    id: str = ""
    marked: bool = False

    async def failed(self) -> None:
        """Count the failure (and the block it may start)."""
        guard, self.guard = self.guard, None
        if guard is not None:
            await guard.record_failure(self)

    def done(self) -> None:
        """The attempt succeeded or was refused for another reason: stop counting it."""
        guard, self.guard = self.guard, None
        if guard is not None and guard.enforce and self.id:
            guard.release(self)


class LockoutGuard:
    """The lockout of one step (auth or mfa) of a route: enforced, or in shadow mode."""

    def __init__(self, store: Store, spec: Lockout, *, enforce: bool, step: str) -> None:
        self.store = store
        self.spec = spec
        self.enforce = enforce
        self.step = step
        self.fail_open = spec.on_backend_error == "open"
        # Shadow mode counts in keys of its own: enforcing later starts everyone afresh.
        self.part = "lo" if enforce else "los"
        self.settings = (
            spec.failures,
            max(1, round(spec.per * 1000)),
            max(1, round(spec.block * 1000)),
            ATTEMPT_LEASE_MS,
        )

    def describe(self) -> str:
        """One line for explain."""
        shadow = " (shadow: enforce false)" if not self.enforce else ""
        return (
            f"lockout after {self.spec.failures} failures in {format_duration(self.spec.per)} "
            "per address, and per subject at the addresses that failed for it, for "
            f"{format_duration(self.spec.block)}{shadow}"
        )

    # --- the calls ------------------------------------------------------------------

    def _sides(self, client: str | None, account: str | None) -> tuple[list[str], list[str]]:
        key, part = self.store.key, self.part
        tag = address_tag(client)
        address = [key(tag, part, "b"), key(tag, part, "f"), key(tag, part, "p")]
        if account is None:
            return address, []
        stag = subject_tag(account)
        subject = [key(stag, part, name) for name in ("f", "x", "h", "a", "i")]
        return address, subject

    async def _run(
        self, op: str, client: str | None, account: str | None, id_: str = "", marked: int = 0
    ) -> tuple[int, int, int]:
        address, subject = self._sides(client, account)
        args = (*self.settings, id_, client or "-", "1" if marked else "0")
        name = f"lockout {op}"

        async def call(sides: str, keys: list[str]) -> tuple[int, int, int]:
            reply = await self.store.run(
                "lockout", keys, [op, sides, *args], operation=name, fail_open=self.fail_open
            )
            return _ints(reply)

        if not subject:
            return await call("a", address)
        if not self.store.cluster:
            return await call("as", address + subject)
        # A cluster: one call per side (each side's keys share one hash tag).
        if op == "try":
            first = await call("a", address)
            if first[0] != FREE:
                return first
            second = await call("s", subject)
            if second[0] != FREE:
                await self._undo(client, id_)
            return second
        one, two = await asyncio.gather(call("a", address), call("s", subject))
        code = max(one[0], two[0])
        return code, max(one[1], two[1]), max(one[2], two[2])

    async def _undo(self, client: str | None, id_: str) -> None:
        address, _ = self._sides(client, None)
        args = ("done", "a", *self.settings, id_, client or "-", "0")
        await self.store.run(
            "lockout", address, args, operation="lockout done", fail_open=self.fail_open
        )

    def _without(self, ctx: Context, exc: StorageError) -> None:
        """Valkey failed: go on without counting (open), or refuse with 503 (closed)."""
        backend_error(ctx.route, exc)
        if not exc.fail_open:
            raise Denial(
                Problems.BACKEND_UNAVAILABLE,
                "authentication attempts cannot be counted right now; try again shortly",
                headers={"Retry-After": "1"},
            ) from exc
        backend_warning(ctx.route, exc, "brute-force lockout not applied: ", log)

    def _refuse(self, ctx: Context, code: int, ms: int) -> None:
        """429 for a blocked address or subject (or too many attempts in flight)."""
        if code == BLOCKED:
            wait = max(1, math.ceil(ms / 1000))
            detail = f"too many failed authentications; try again in {wait} s"
            outcome = "blocked"
        else:
            wait = 1
            detail = (
                "as many authentication attempts are in progress as failures are allowed; "
                "retry shortly"
            )
            outcome = "busy"
        denial = Denial(Problems.AUTH_LOCKED, detail, headers={"Retry-After": str(wait)})
        if self.enforce:
            ctx.decide("lockout", outcome)
            raise denial
        ctx.decide("lockout", "shadow_" + outcome)
        shadow_denial(ctx, self.step, denial)

    # --- what steps call --------------------------------------------------------------

    async def admit(self, ctx: Context, account: str | None) -> None:
        """A token verified before (no attempt): refused while its address or subject is blocked."""
        try:
            code, ms, _ = await self._run("check", ctx.client, account)
        except StorageError as exc:
            self._without(ctx, exc)
            return
        if code != FREE:
            self._refuse(ctx, code, ms)

    async def attempt(self, ctx: Context, account: str | None) -> Attempt:
        """Begin an attempt (a token not seen before, a code): refused while blocked or busy."""
        if not self.enforce:
            try:
                code, ms, _ = await self._run("check", ctx.client, account)
            except StorageError as exc:
                self._without(ctx, exc)
                return Attempt(None, ctx, account)
            if code != FREE:
                self._refuse(ctx, code, ms)
            return Attempt(self, ctx, account, IDS.next())
        id_ = IDS.next()
        try:
            code, ms, marked = await self._run("try", ctx.client, account, id_)
        except StorageError as exc:
            self._without(ctx, exc)
            return Attempt(None, ctx, account)
        if code != FREE:
            self._refuse(ctx, code, ms)
        return Attempt(self, ctx, account, id_, bool(marked))

    async def counted(
        self,
        ctx: Context,
        account: str | None,
        check: Callable[[], Awaitable[None]],
        failure: ProblemType,
    ) -> None:
        """Run `check` as one attempt; a Denial of `failure` counts as a failed one."""
        attempt = await self.attempt(ctx, account)
        try:
            await check()
        except Denial as denial:
            if denial.problem is failure:
                await attempt.failed()
            else:
                attempt.done()
            raise
        except BaseException:
            attempt.done()
            raise
        attempt.done()

    async def record_failure(self, attempt: Attempt) -> None:
        """Count a failed attempt; say when it started a block."""
        ctx = attempt.ctx
        prefix = "" if self.enforce else "shadow_"
        try:
            blocked, _, _ = await self._run(
                "fail", ctx.client, attempt.account, attempt.id, int(attempt.marked)
            )
        except StorageError as exc:
            backend_error(ctx.route, exc)
            backend_warning(ctx.route, exc, "a failed authentication was not counted: ", log)
            return
        ctx.decide("lockout", prefix + ("locked" if blocked else "failure"))

    def release(self, attempt: Attempt) -> None:
        """Stop counting an attempt in flight (queued, not awaited, on one server)."""
        ctx = attempt.ctx
        address, subject = self._sides(ctx.client, attempt.account)
        args: list[Arg] = ["done", "", *self.settings, attempt.id, ctx.client or "-"]
        args.append("1" if attempt.marked else "0")
        calls: list[tuple[str, list[str]]]
        if not subject or not attempt.marked:
            calls = [("a", address)]
        elif self.store.cluster:
            calls = [("a", address), ("s", subject)]
        else:
            calls = [("as", address + subject)]
        route = ctx.route

        def failed(exc: StorageError) -> None:
            backend_error(route, exc)
            backend_warning(route, exc)

        for sides, keys in calls:
            args[1] = sides
            if self.store.queues_first:
                self.store.submit(
                    "lockout", keys, list(args), operation="lockout done", on_error=failed
                )
            else:
                task = asyncio.get_running_loop().create_task(self._release(keys, list(args)))
                _PENDING.add(task)
                task.add_done_callback(_PENDING.discard)

    async def _release(self, keys: list[str], args: list[Arg]) -> None:
        try:
            await self.store.run("lockout", keys, args, operation="lockout done", fail_open=True)
        except StorageError as exc:
            log.debug("policyroute: lockout release failed: %s", exc)


_PENDING: set[asyncio.Task[None]] = set()
