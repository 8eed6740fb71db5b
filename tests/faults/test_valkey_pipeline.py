"""ValkeyStore's auto-pipelined connection through every Valkey fault, under concurrent load.

32 independent callers each loop on commands whose reply names the request (`ECHO tag`,
`EVAL "return ARGV[1]" 0 tag`) or the caller (the packaged `credits_peek` script, through
`store.run`, on a balance of the caller's own), while a fault comes and goes. After each:
every caller got its own reply or a StorageError, never another's and never any other
exception; no call hung; commands succeed again within 2 s of the fault's end, and from
then on every call gets its own reply.

The store reaches its dedicated server (never the session's) through a FaultProxy, with
database 1 in its URL and a script registered, so every reconnect has a handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from policyroute.backends.embedded import EmbeddedValkey
from policyroute.backends.valkey import ValkeyStore
from policyroute.errors import StorageError

from .kit import RECOVERY, valkey_faults
from .proxy import FaultProxy

CALLERS = 32
WARM = 0.2  # load before the fault
STEADY = 0.5  # load after recovery, when every call must get its own reply
HANG = 3.0  # no call may take longer, whatever the fault
ECHO_SCRIPT = "return ARGV[1]"


@dataclass
class Tally:
    """What the callers got."""

    own: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wrong: list[tuple[str, Any]] = field(default_factory=list)  # (asked for, got)
    unexpected: list[str] = field(default_factory=list)  # exceptions other than StorageError
    hung: int = 0
    emptied: int = 0  # a balance read as 0: the server restarted without its data

    @property
    def total(self) -> int:
        return (
            self.own + sum(self.errors.values()) + len(self.wrong) + len(self.unexpected)
            + self.hung + self.emptied
        )  # fmt: skip


class Callers:
    """Independent callers of one store, each checking that every reply is its own."""

    def __init__(self, store: ValkeyStore, balances: list[tuple[str, str]]) -> None:
        self.store = store
        self.balances = balances
        self.during = Tally()  # from the start until recovery
        self.after = Tally()  # from recovery on
        self.phase = self.during
        self.stop = asyncio.Event()

    async def one(self, caller: int, n: int) -> None:
        tally = self.phase
        tag = f"c{caller}.{n}"
        kind = n % 3
        try:
            async with asyncio.timeout(HANG):
                if kind == 0:
                    got: Any = await self.store.command("ECHO", tag, operation="echo")
                    expected: Any = tag.encode()
                elif kind == 1:
                    got = await self.store.command("EVAL", ECHO_SCRIPT, 0, tag, operation="eval")
                    expected = tag.encode()
                else:
                    tag = f"c{caller}.balance"
                    got = await self.store.run(
                        "credits_peek", self.balances[caller], [0, "-"],
                        operation="peek", fail_open=False,
                    )  # fmt: skip
                    expected = 1000 + caller
        except TimeoutError:
            tally.hung += 1
            return
        except StorageError as exc:
            tally.errors[type(exc.cause).__name__] += 1
            return
        except Exception as exc:
            tally.unexpected.append(f"{tag}: {exc!r}")
            return
        if got == expected:
            tally.own += 1
        elif kind == 2 and got == 0:
            tally.emptied += 1
        else:
            tally.wrong.append((tag, got))

    async def caller(self, caller: int) -> None:
        n = 0
        while not self.stop.is_set():
            await self.one(caller, n)
            n += 1
            await asyncio.sleep(0.002)


async def _seed(store: ValkeyStore, balances: list[tuple[str, str]]) -> None:
    async with asyncio.timeout(HANG):
        for i, (balance, _) in enumerate(balances):
            await store.command("HSET", balance, "b", 1000 + i, operation="seed")


async def _recovered(store: ValkeyStore) -> float | None:
    """Seconds until sequential commands get their own replies again (None: not in 2 s)."""
    started = time.monotonic()
    n = 0
    while (elapsed := time.monotonic() - started) < RECOVERY:
        n += 1
        tag = f"probe{n}"
        try:
            async with asyncio.timeout(max(0.05, RECOVERY - elapsed)):
                if await store.command("ECHO", tag, operation="probe") == tag.encode():
                    return time.monotonic() - started
        except Exception:  # noqa: S110 - the callers count what went wrong; keep probing
            pass
        await asyncio.sleep(0.02)
    return None


def _summary(name: str, callers: Callers, recovery: float | None) -> list[str]:
    """Every broken invariant, in words."""
    during, after = callers.during, callers.after
    total = during.total + after.total
    problems: list[str] = []
    wrong = during.wrong + after.wrong
    if wrong:
        problems.append(
            f"{len(wrong)} of {total} calls got another caller's reply "
            f"(e.g. asked {wrong[0][0]!r}, got {wrong[0][1]!r}; {len(after.wrong)} of them "
            "after recovery)"
        )
    unexpected = during.unexpected + after.unexpected
    if unexpected:
        problems.append(
            f"{len(unexpected)} calls raised something other than StorageError "
            f"(e.g. {unexpected[0]})"
        )
    if during.hung or after.hung:
        problems.append(f"{during.hung + after.hung} calls hung for {HANG} s")
    if during.emptied and name != "sigkill-restart":
        problems.append(f"{during.emptied} balances read as 0 without a restart")
    if recovery is None:
        problems.append(f"sequential commands still failed {RECOVERY} s after the fault ended")
    if after.errors or after.emptied:
        problems.append(
            f"after recovery {sum(after.errors.values())} of {after.total} calls failed "
            f"({dict(after.errors)}), {after.emptied} read an emptied balance"
        )
    if recovery is not None and after.own == 0:
        problems.append("no call succeeded after recovery")
    return problems


FAULTS = [
    "sigstop", "pause", "delay", "blackhole", "reset-mid-reply", "drop", "half-close",
    "sigkill-restart",
]  # fmt: skip


@pytest.mark.parametrize("fault", FAULTS)
async def test_every_caller_gets_its_own_reply_or_an_error(
    fault: str, server: EmbeddedValkey, proxy: FaultProxy
) -> None:
    store = ValkeyStore(proxy.url("redis", "/1"), prefix="f" + uuid.uuid4().hex[:8])
    balances = [(store.key(f"c{i}", "credits"), store.key(f"c{i}", "credits") + ":held")
                for i in range(CALLERS)]  # fmt: skip
    callers = Callers(store, balances)
    stopped = True
    try:
        await _seed(store, balances)
        tasks = [asyncio.create_task(callers.caller(i)) for i in range(CALLERS)]
        await asyncio.sleep(WARM)
        faults = valkey_faults(server, proxy)
        await faults[fault].run()
        if fault == "sigkill-restart":
            with contextlib.suppress(StorageError, TimeoutError):
                await _seed(store, balances)  # the balances the restarted server lost
        recovery = await _recovered(store)
        callers.phase = callers.after
        await asyncio.sleep(STEADY)
        callers.stop.set()
        await asyncio.gather(*tasks)
    finally:
        proxy.heal()
        try:
            async with asyncio.timeout(HANG):
                await store.stop()
        except TimeoutError:
            stopped = False
    problems = _summary(fault, callers, recovery)
    if not stopped:
        problems.append(f"store.stop() had not returned after {HANG} s")
    during = callers.during
    report = (
        f"{fault}: {during.total + callers.after.total} calls, {during.own} own replies and "
        f"{dict(during.errors)} errors during the fault; recovered in "
        f"{'-' if recovery is None else f'{recovery:.2f} s'}"
    )
    if during.own == 0:
        problems.append("no call succeeded before the fault: the load did not run")
    if problems:
        # pytrace=False: the summary says it all (and after such a run on the old pipeline,
        # pytest's own traceback formatting failed: SystemError from CPython's ast).
        pytest.fail(report + "\n  " + "\n  ".join(problems), pytrace=False)
