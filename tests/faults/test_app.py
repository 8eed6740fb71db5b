"""Real uvicorn (2 workers) through Valkey faults, under load from four users.

Four users, four keep-alive clients each, call a per-user cached route, a credits route
and a rate limited route that fails closed, before, during and after one fault of the
workers' Valkey (a dedicated server, reached through a FaultProxy). After each fault:

- no 500, and no status but 200 (and 503 backend-unavailable until 2 s after the fault);
- every answer names its caller and its route (no reply, cached or not, reaches the
  wrong caller);
- no request goes unanswered for 5 s;
- from 2 s after the fault's end every worker answers every request normally (both
  workers are reached on fresh connections);
- each user's credits charged equal that user's paid 200s (reservations left by failed
  requests are refunded after the 1 s hold, and none is left held);
- after SIGTERM, uvicorn and both workers exit within 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from policyroute.admin import credits
from policyroute.backends.embedded import EmbeddedValkey
from policyroute.backends.valkey import ValkeyStore
from policyroute.errors import Problems
from tests.servers import uvicorn
from tests.steps.identity_kit import bearer, subject, token

from .app import HOLD, POLICY
from .kit import RECOVERY, valkey_faults
from .proxy import FaultProxy

USERS = 4
CLIENTS_PER_USER = 4
PATHS = ("/mine/a", "/charge", "/mine/b", "/limited", "/mine/c", "/charge")
BALANCE = 1_000_000
WARM = 0.3  # load before the fault
WARM_MAX = 5.0  # cold workers (first JWKS, script loads) may take longer to answer
STEADY = 0.5  # load from RECOVERY after the fault's end, when everything must be normal
FRESH = 1.5  # at most this long to reach both workers on fresh connections
TIMEOUT = 5.0  # an answer later than this is a hang
EXIT = 5.0  # seconds from SIGTERM to every process gone


@dataclass(frozen=True)
class Answer:
    """One request as its client saw it.

    `at`: when it was sent, in seconds after the fault ended (< 0: before); recorded as
    monotonic time, made relative by `Load.relative` once the run is over.
    """

    at: float
    user: int
    path: str
    status: int  # 0: no answer (a transport error or TIMEOUT)
    pid: str = ""
    subject: str = ""
    route: str = ""
    problem: str = ""
    hit: bool = False
    error: str = ""
    fresh: bool = False  # on a connection of its own

    @property
    def normal(self) -> bool:
        return self.status == 200 and self.subject != "" and self.route == _route(self.path)


def _route(path: str) -> str:
    return path.split("/")[1]


@dataclass
class Load:
    """Clients of several users; every answer recorded."""

    base: str
    users: list[str]
    answers: list[Answer] = field(default_factory=list)
    healed: float = float("inf")  # monotonic time the fault ended
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    headers: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.headers = [bearer(token(user)) for user in self.users]

    def relative(self) -> None:
        """Every answer's `at` in seconds after the fault ended."""
        self.answers = [dataclasses.replace(a, at=a.at - self.healed) for a in self.answers]

    def now(self) -> float:
        return time.monotonic() - self.healed if self.healed != float("inf") else -1.0

    async def call(self, c: httpx.AsyncClient, user: int, path: str, *, fresh: bool) -> Answer:
        at = time.monotonic()
        try:
            r = await c.get(path, headers=self.headers[user])
        except httpx.HTTPError as exc:
            answer = Answer(at, user, path, 0, error=type(exc).__name__, fresh=fresh)
        else:
            body: dict[str, object] = {}
            with contextlib.suppress(ValueError):
                parsed = r.json()
                body = parsed if isinstance(parsed, dict) else {}
            answer = Answer(
                at,
                user,
                path,
                r.status_code,
                pid=r.headers.get("x-pid", ""),
                subject=str(body.get("subject", "")),
                route=str(body.get("route", "")),
                problem=str(body.get("type", "")),
                hit=r.headers.get("x-cache") == "hit",
                fresh=fresh,
            )
        self.answers.append(answer)
        return answer

    async def client(self, user: int, offset: int) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=TIMEOUT) as c:
            n = offset
            while not self.stop.is_set():
                await self.call(c, user, PATHS[n % len(PATHS)], fresh=False)
                n += 1

    async def warm(self) -> None:
        """Until every client had two normal answers (at least WARM s, at most WARM_MAX s)."""
        started = time.monotonic()
        wanted = 2 * USERS * CLIENTS_PER_USER
        while time.monotonic() - started < WARM or (  # noqa: ASYNC110 - polls the answers
            sum(a.normal for a in self.answers) < wanted
            and time.monotonic() - started < WARM_MAX
        ):
            await asyncio.sleep(0.02)

    async def reach_every_worker(self, workers: int) -> set[str]:
        """Requests on fresh connections until `workers` processes answered normally."""
        normal: set[str] = set()
        deadline = time.monotonic() + FRESH
        n = 0
        while len(normal) < workers and time.monotonic() < deadline:
            async def one(k: int) -> Answer:
                async with httpx.AsyncClient(base_url=self.base, timeout=TIMEOUT) as c:
                    return await self.call(c, k % USERS, PATHS[k % len(PATHS)], fresh=True)

            batch = await asyncio.gather(*(one(n + k) for k in range(6)))
            n += 6
            normal |= {a.pid for a in batch if a.normal}
        return normal


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def _analyse(load: Load, workers_normal: set[str], workers: int) -> list[str]:
    problems: list[str] = []
    answers = load.answers
    unavailable = Problems.BACKEND_UNAVAILABLE.uri
    errors = [a for a in answers if a.status >= 500 and a.status != 503]
    if errors:
        problems.append(
            f"{len(errors)} answers were {dict(Counter(a.status for a in errors))} "
            f"(e.g. {errors[0].path} at {errors[0].at:+.2f} s)"
        )
    odd = [a for a in answers if a.status not in (0, 200, 503) and a.status < 500]
    if odd:
        problems.append(f"{len(odd)} answers had statuses {dict(Counter(a.status for a in odd))}")
    not_backend = [a for a in answers if a.status == 503 and a.problem != unavailable]
    if not_backend:
        problems.append(f"{len(not_backend)} 503s were not backend-unavailable problems")
    wrong = [
        a
        for a in answers
        if a.status == 200 and (a.subject != load.users[a.user] or a.route != _route(a.path))
    ]
    if wrong:
        hits = sum(a.hit for a in wrong)
        w = wrong[0]
        problems.append(
            f"{len(wrong)} of {sum(a.status == 200 for a in answers)} 200s reached the wrong "
            f"caller ({hits} of them cache hits; e.g. user {w.user} asked {w.path}, got "
            f"subject {w.subject!r} route {w.route!r} at {w.at:+.2f} s)"
        )
    hung = [a for a in answers if a.status == 0]
    if hung:
        problems.append(
            f"{len(hung)} requests got no answer ({dict(Counter(a.error for a in hung))}; "
            f"timeout {TIMEOUT} s)"
        )
    late = [a for a in answers if a.at >= RECOVERY and not a.normal]
    if late:
        last = max(a.at for a in late)
        problems.append(
            f"{len(late)} of {sum(a.at >= RECOVERY for a in answers)} answers from "
            f"{RECOVERY} s after the fault were not normal "
            f"({dict(Counter(a.status for a in late))}; the last at {last:+.2f} s, "
            f"from workers {sorted({a.pid for a in late})})"
        )
    if len(workers_normal) < workers:
        problems.append(
            f"only {len(workers_normal)} of {workers} workers answered normally on fresh "
            f"connections between {RECOVERY} and {RECOVERY + FRESH} s after the fault"
        )
    return problems


@pytest.mark.parametrize("fault", ["sigstop", "pause", "delay", "reset-mid-reply", "blackhole"])
async def test_two_workers_serve_every_user_right_through_a_valkey_fault(
    fault: str, server: EmbeddedValkey, proxy: FaultProxy, policy_dir: Path
) -> None:
    (policy_dir / "routes.yaml").write_text(POLICY)
    users = [subject() for _ in range(USERS)]
    faults = valkey_faults(server, proxy)
    workers = 2
    with uvicorn(
        policy_dir, proxy.url("redis", "/0"), app="tests.faults.app:worker_app", workers=workers
    ) as served:
        direct = ValkeyStore(server.url, prefix=served.prefix)  # not through the proxy
        try:
            for user in users:
                await credits.set_balance(direct, user, BALANCE)
            load = Load(served.base, users)
            clients = [
                asyncio.create_task(load.client(u, k))
                for u in range(USERS)
                for k in range(CLIENTS_PER_USER)
            ]
            await load.warm()
            await faults[fault].run()
            proxy.heal()
            load.healed = time.monotonic()
            await asyncio.sleep(RECOVERY)
            reached = await load.reach_every_worker(workers)
            await asyncio.sleep(max(0.0, RECOVERY + STEADY - load.now()))
            load.stop.set()
            await asyncio.gather(*clients)
            # Reservations of failed requests are refunded by the account's next charge
            # once their hold has passed: one more paid call per user, counted like any.
            await asyncio.sleep(HOLD + 0.1)
            async with httpx.AsyncClient(base_url=served.base, timeout=TIMEOUT) as c:
                for u in range(USERS):
                    await load.call(c, u, "/charge", fresh=True)
            # Each call's commit is sent after its response: give the last ones a moment.
            settled = time.monotonic() + 2.0
            while True:
                balances = [await credits.show(direct, user) for user in users]
                if not any(b.held for b in balances) or time.monotonic() > settled:
                    break
                await asyncio.sleep(0.05)
        finally:
            proxy.heal()
            await direct.stop()
        pids = {int(a.pid) for a in load.answers if a.pid}
        exit_after = await _stop(served.proc, pids)

    load.relative()
    problems = _analyse(load, reached, workers)
    for u, balance in enumerate(balances):
        paid = sum(a.status == 200 for a in load.answers if a.user == u and a.path == "/charge")
        charged = BALANCE - balance.total
        if charged != paid or balance.held:
            problems.append(
                f"user {u}: {paid} paid 200s, {charged} credits charged, {balance.held} still "
                "held"
            )
    if exit_after is None:
        problems.append(f"uvicorn or a worker had not exited {EXIT} s after SIGTERM")
    statuses = Counter(a.status for a in load.answers)
    report = (
        f"{fault}: {len(load.answers)} requests {dict(statuses)}, "
        f"{sum(a.at < 0 for a in load.answers)} before the fault ended; "
        f"exit {'-' if exit_after is None else f'{exit_after:.2f} s'} after SIGTERM"
    )
    if sum(a.status == 200 and a.at < 0 for a in load.answers) == 0:
        problems.append("no request succeeded before the fault ended: the load did not run")
    print(report)
    if problems:
        pytest.fail(report + "\n  " + "\n  ".join(problems), pytrace=False)


async def _stop(proc: subprocess.Popen[bytes], pids: set[int]) -> float | None:
    """SIGTERM uvicorn; seconds until it and every worker in `pids` exited (None: > EXIT)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    everyone = {proc.pid, *pids}
    while time.monotonic() - started < EXIT:
        if proc.poll() is not None and all(_gone(p) for p in pids):
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    for pid in everyone:  # not exited in time: make sure they are gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(proc.wait, 5)
    return None
