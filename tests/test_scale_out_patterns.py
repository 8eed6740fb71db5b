"""Lockout, one-time tokens, throttle and debounce: exact across two uvicorn workers.

Two worker processes of one app share a real Valkey (one server, and a 3-node cluster,
where the address side and the subject side of a lockout, and a request's limits, may
live on different nodes). Concurrent clients, each on its own connection so both
processes serve them, get exact counts: whatever the interleaving, at most `failures`
bad tokens are evaluated from one address, a one-time token runs one request, a throttle
lets `burst + 1` through one interval apart, a debounce runs its handler once per burst.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.servers import uvicorn
from tests.steps.identity_kit import ISSUER_YAML, bearer, subject, token

SETTINGS = f"""\
settings:
  trusted_proxies: [127.0.0.1/32]
  auth:
    realm: io
    require_typ: at+jwt
    lockout: {{failures: 10, per: 5m, block: 15m}}
    issuers:
{ISSUER_YAML}"""

POLICY = f"""\
version: 1
{SETTINGS}routes:
  GET /limited: {{}}
  GET /other:
    replay: jti
  GET /throttled:
    rate_limit: {{key: user, algorithm: throttle, capacity: 1, per: 1s, burst: 3}}
  GET /debounced:
    rate_limit: {{key: user, algorithm: debounce, per: 10s}}
  POST /joined:
    rate_limit: {{key: user, algorithm: debounce, per: 10s, on_repeat: join}}
"""

_addresses = itertools.count(1)


def address() -> str:
    """A client address no other test of the module uses (sent through the trusted proxy)."""
    n = next(_addresses)
    return f"10.{n // 250}.{n % 250}.9"


def forged(valid: str, n: int = 0) -> str:
    """The token with its signature broken (the nth way): it still claims the same subject."""
    head, payload, signature = valid.split(".")
    return f"{head}.{payload}.{n:08d}{signature[8:]}"


@pytest.fixture(scope="module", params=["server", "cluster"])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Two worker processes on one Valkey server, or on a Valkey cluster: the base URL."""
    policy_dir = tmp_path_factory.mktemp("patterns")
    (policy_dir / "routes.yaml").write_text(POLICY)
    cluster = request.param == "cluster"
    url = request.getfixturevalue("cluster_url" if cluster else "valkey_url")
    with uvicorn(policy_dir, url, workers=2, cluster=cluster) as served:
        yield served.base


async def connections(base: str, n: int) -> list[httpx.AsyncClient]:
    """`n` clients, each with a connection open to one of the two processes, half to each.

    The kernel decides which process accepts a connection; connections are opened (and
    probed for the process that answers) until each process has its half. The chosen ones
    are probed again last: a connection the server closed meanwhile (its keep-alive ran
    out while more were opened) would reconnect to either process.
    """
    for _ in range(5):
        chosen = await _split(base, n)
        again = await asyncio.gather(*(c.get("/nothing-here") for c in chosen))
        first = {r.headers["x-pid"] for r in again[: n - n // 2]}
        second = {r.headers["x-pid"] for r in again[n - n // 2 :]}
        if len(first) == 1 and len(second) <= 1 and first != second:
            return chosen
        for c in chosen:
            await c.aclose()
    raise RuntimeError("the connections did not stay with their processes")


async def _split(base: str, n: int) -> list[httpx.AsyncClient]:
    want = {0: n - n // 2, 1: n // 2}
    seen: dict[str, list[httpx.AsyncClient]] = {}
    spare: list[httpx.AsyncClient] = []
    for _ in range(50):
        batch = [httpx.AsyncClient(base_url=base, timeout=30) for _ in range(n)]
        probes = await asyncio.gather(*(c.get("/nothing-here") for c in batch))
        for c, probe in zip(batch, probes, strict=True):
            seen.setdefault(probe.headers["x-pid"], []).append(c)
        groups = sorted(seen.values(), key=len, reverse=True)
        if len(groups) == 2 and all(len(g) >= want[i] for i, g in enumerate(groups)):
            chosen = [*groups[0][: want[0]], *groups[1][: want[1]]]
            spare = [c for g in groups for c in g if c not in chosen]
            break
    else:
        raise RuntimeError("one process accepted every connection")
    for c in spare:
        await c.aclose()
    return chosen


async def spread(
    base: str, method: str, path: str, n: int, headers: dict[str, str], body: bytes = b""
) -> list[httpx.Response]:
    """`n` concurrent requests, each on its own connection, half to each process."""
    return await spread_each(base, method, path, [headers] * n, body)


async def spread_each(
    base: str, method: str, path: str, each: list[dict[str, str]], body: bytes = b""
) -> list[httpx.Response]:
    """One request per headers of `each`, all at once, half to each process."""
    n = len(each)
    clients = await connections(base, n) if n > 1 else [httpx.AsyncClient(base_url=base)]
    try:
        return list(
            await asyncio.gather(
                *(
                    c.request(method, path, headers=h, content=body)
                    for c, h in zip(clients, each, strict=True)
                )
            )
        )
    finally:
        for c in clients:
            await c.aclose()


def statuses(answers: list[httpx.Response]) -> Counter[int]:
    return Counter(r.status_code for r in answers)


def kinds(answers: list[httpx.Response]) -> Counter[str]:
    return Counter(str(r.json().get("type", "")).rsplit(":", 1)[-1] for r in answers)


def pids(answers: list[httpx.Response]) -> set[str]:
    return {r.headers["x-pid"] for r in answers}


async def test_an_address_gets_exactly_failures_bad_tokens_evaluated(fleet: str) -> None:
    attacker, bystander = address(), address()
    valid = token(subject())
    guesses = [{**bearer(forged(valid, n)), "X-Forwarded-For": attacker} for n in range(40)]
    answers = await spread_each(fleet, "GET", "/limited", guesses)
    assert statuses(answers) == Counter({401: 10, 429: 30})
    assert len(pids(answers)) == 2
    assert kinds([r for r in answers if r.status_code == 429]) == Counter({"auth-locked": 30})
    # The same bad token sent at once is one guess (one failure in each process).
    same = {**bearer(forged(token(subject()))), "X-Forwarded-For": address()}
    assert statuses(await spread(fleet, "GET", "/limited", 20, same)) == Counter({401: 20})
    # Blocked for everyone, valid tokens included; other addresses are not.
    fine = bearer(token(subject()))
    later = await spread(fleet, "GET", "/limited", 6, {**fine, "X-Forwarded-For": attacker})
    assert statuses(later) == Counter({429: 6})
    assert all(850 <= int(r.headers["retry-after"]) <= 900 for r in later)
    elsewhere = await spread(fleet, "GET", "/limited", 6, {**fine, "X-Forwarded-For": bystander})
    assert statuses(elsewhere) == Counter({200: 6})


async def test_a_subject_is_blocked_only_where_it_failed(fleet: str) -> None:
    victim = subject()
    valid = token(victim)
    bad = forged(valid)
    attackers = [address() for _ in range(10)]
    home, fresh = address(), address()

    async def from_(where: str, value: str, n: int = 1) -> list[httpx.Response]:
        return await spread(fleet, "GET", "/limited", n, {**bearer(value), "X-Forwarded-For": where})

    # One failure from each of ten addresses: no address is over its own limit, the
    # victim's subject is (10 failures in the window).
    first = await asyncio.gather(*(from_(a, bad) for a in attackers))
    assert statuses([r for answers in first for r in answers]) == Counter({401: 10})
    # Each failing address is now blocked for the victim, valid token or not...
    blocked = await asyncio.gather(*(from_(a, valid) for a in attackers))
    assert statuses([r for answers in blocked for r in answers]) == Counter({429: 10})
    # ...but not for anyone else, and the victim's own address was never blocked.
    other = bearer(token(subject()))["Authorization"].removeprefix("Bearer ")
    assert statuses(await from_(attackers[0], other, 3)) == Counter({200: 3})
    # (one at a time: while the subject is hot, an address has one unverified token or code
    # of it in flight at a time; a token verified before is only checked)
    assert [(await from_(home, valid))[0].status_code for _ in range(3)] == [200, 200, 200]
    # While the subject is hot, a new address gets one attempt in flight, however many
    # guesses it sends at once, and is blocked for the subject at its first failure.
    guesses = [{**bearer(forged(valid, n)), "X-Forwarded-For": fresh} for n in range(1, 11)]
    burst = await spread_each(fleet, "GET", "/limited", guesses)
    assert statuses(burst) == Counter({401: 1, 429: 9})
    assert statuses(await from_(fresh, valid, 2)) == Counter({429: 2})
    assert [(await from_(home, valid))[0].status_code for _ in range(2)] == [200, 200]


async def test_a_one_time_token_runs_one_request(fleet: str) -> None:
    once = bearer(token(subject()))
    answers = await spread(fleet, "GET", "/other", 20, once)
    assert statuses(answers) == Counter({200: 1, 401: 19})
    assert len(pids(answers)) == 2
    refused = [r for r in answers if r.status_code == 401]
    assert kinds(refused) == Counter({"token-replayed": 19})
    assert all('error="invalid_token"' in r.headers["www-authenticate"] for r in refused)
    again = await spread(fleet, "GET", "/other", 2, once)
    assert statuses(again) == Counter({401: 2})
    assert statuses(await spread(fleet, "GET", "/other", 1, bearer(token(subject())))) == {200: 1}


async def test_a_throttle_lets_burst_plus_one_through_one_interval_apart(fleet: str) -> None:
    who = bearer(token(subject()))
    # Timed from when the connections are open, half to each process (opening them probes
    # which process the kernel picked, and may take a while on a busy machine).
    clients = await connections(fleet, 10)
    try:
        started = time.monotonic()
        answers = list(await asyncio.gather(*(c.get("/throttled", headers=who) for c in clients)))
        took = time.monotonic() - started
    finally:
        for c in clients:
            await c.aclose()
    assert statuses(answers) == Counter({200: 4, 429: 6})
    assert len(pids(answers)) == 2
    refused = [r for r in answers if r.status_code == 429]
    assert kinds(refused) == Counter({"rate-limited": 6})
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    # The four ran one second apart, whichever process ran them (Valkey's schedule).
    ran = sorted(r.json()["at"] for r in answers if r.status_code == 200)
    gaps = [b - a for a, b in itertools.pairwise(ran)]
    assert all(0.95 <= gap <= 1.25 for gap in gaps), gaps
    assert 2.9 <= took < 6


async def test_a_debounce_refuses_every_repeat_within_the_quiet_window(fleet: str) -> None:
    who = bearer(token(subject()))
    answers = await spread(fleet, "GET", "/debounced?q=1", 20, who)
    assert statuses(answers) == Counter({200: 1, 429: 19})
    assert len(pids(answers)) == 2
    refused = [r for r in answers if r.status_code == 429]
    assert {r.headers["retry-after"] for r in refused} == {"10"}
    # Another request (another query) is not a repeat.
    assert statuses(await spread(fleet, "GET", "/debounced?q=2", 1, who)) == Counter({200: 1})


async def test_a_debounce_that_joins_runs_the_handler_once_per_burst(fleet: str) -> None:
    who = {**bearer(token(subject())), "content-type": "application/json"}
    body = b'{"order": 42}'
    answers = await spread(fleet, "POST", "/joined?sleep=0.5", 20, who, body)
    assert statuses(answers) == Counter({200: 20})
    assert len(pids(answers)) == 2
    assert len({r.json()["run"] for r in answers}) == 1  # one run, every answer its bytes
    assert Counter(r.headers.get("x-debounce") for r in answers) == Counter({None: 1, "joined": 19})
    later = await spread(fleet, "POST", "/joined?sleep=0.5", 3, who, body)
    assert {r.json()["run"] for r in later} == {answers[0].json()["run"]}
    other = await spread(fleet, "POST", "/joined?sleep=0.5", 1, who, b'{"order": 43}')
    assert other[0].json()["run"] != answers[0].json()["run"]
