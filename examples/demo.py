"""`make demo`: start the example on embedded backends, call every denial and success path, stop.

    python -m examples.demo            # starts Valkey, a broker and the example app itself

Against a server you already run (`make run` prints the backend URLs it started):

    python -m examples.demo --url http://127.0.0.1:8000 \\
        --valkey-url redis://127.0.0.1:PORT/0 --pulsar-url pulsar://127.0.0.1:PORT

Each line is one request and what the policy made of it; the exit status is 0 only when
every request was answered as expected. Tokens are minted with the DEV ONLY key in
examples/keys; subjects, idempotency keys and SKUs are fresh on every run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyotp
from joserfc.jwk import RSAKey

from policyroute.admin import credits
from policyroute.backends.valkey import ValkeyStore
from policyroute.errors import PROBLEM_BASE
from policyroute.identity.dev import DEV_KID, load_private_key, mint
from policyroute.identity.totp import enrol

REPO = Path(__file__).resolve().parent.parent
DEV_KEY = REPO / "examples" / "keys" / "dev-private-jwk.json"
ORDERS = "persistent://public/default/orders"
START_TIMEOUT = 30.0


@dataclass
class Demo:
    """One run: the client, the backends, and the tally."""

    client: httpx.AsyncClient
    store: ValkeyStore
    pulsar_url: str
    run: str = field(default_factory=lambda: secrets.token_hex(3))
    passed: int = 0
    failed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = load_private_key(DEV_KEY)

    def user(self, name: str) -> str:
        """A subject unique to this run (limits and balances start fresh)."""
        return f"{name}-{self.run}"

    def token(self, name: str, *scopes: str, roles: Iterable[str] = (), mfa: bool = False) -> str:
        """A DEV ONLY bearer token."""
        amr = ["pwd", "mfa"] if mfa else ["pwd"]
        return mint(self.key, self.user(name), scopes=scopes, roles=roles, amr=amr, ttl=600)

    def expect(
        self,
        title: str,
        response: httpx.Response,
        status: int,
        problem: str | None = None,
        header: str | None = None,
        check: bool = True,
    ) -> httpx.Response:
        """Record whether `response` is what the policy should have answered."""
        got = response.status_code
        kind = ""
        if response.headers.get("content-type", "").startswith("application/problem+json"):
            kind = str(response.json().get("type", "")).removeprefix(PROBLEM_BASE)
        ok = got == status and check
        ok = ok and (problem is None or kind == problem)
        ok = ok and (header is None or header.lower() in response.headers)
        shown = f" {kind}" if kind else ""
        extra = f" [{header}: {response.headers.get(header, '-')}]" if header else ""
        print(f"  {'ok  ' if ok else 'FAIL'} {got}{shown:<26} {title}{extra}", flush=True)
        if ok:
            self.passed += 1
        else:
            want = f"{status} {problem or ''}".strip()
            self.failed.append(f"{title}: wanted {want}, got {got}{shown}: {response.text[:200]}")
        return response


def bearer(token: str, **headers: str) -> dict[str, str]:
    """Request headers with a bearer token."""
    return {"Authorization": f"Bearer {token}", **headers}


def new_key() -> str:
    """A fresh Idempotency-Key (a structured-field string)."""
    return f'"{secrets.token_hex(8)}"'


async def identity(d: Demo) -> None:
    """Who may call: bearer tokens, scopes, roles, MFA step-up, IP allowlist."""
    print("identity: bearer JWT, scopes, roles, step-up MFA, IP allowlist")
    c = d.client
    body = {"resource_id": "r1"}
    d.expect("GET /health is public", await c.get("/health"), 200)
    d.expect(
        "POST /io-job without a token",
        await c.post("/io-job", json=body),
        401,
        "unauthenticated",
        "WWW-Authenticate",
    )
    forged_key = RSAKey.generate_key(2048, parameters={"kid": DEV_KID})
    forged = mint(forged_key, d.user("mallory"), scopes=["run:io_jobs"], roles=["io_job_runner"])
    d.expect(
        "POST /io-job with a token signed by another key",
        await c.post("/io-job", json=body, headers=bearer(forged)),
        401,
        "invalid-token",
    )
    no_scope = d.token("alice", "read:user", roles=["io_job_runner"], mfa=True)
    d.expect(
        "POST /io-job without scope run:io_jobs",
        await c.post("/io-job", json=body, headers=bearer(no_scope)),
        403,
        "insufficient-scope",
        "WWW-Authenticate",
    )
    no_role = d.token("alice", "run:io_jobs", mfa=True)
    d.expect(
        "POST /io-job without role io_job_runner",
        await c.post("/io-job", json=body, headers=bearer(no_role)),
        403,
        "forbidden-role",
    )
    no_mfa = d.token("alice", "run:io_jobs", roles=["io_job_runner"])
    d.expect(
        "POST /io-job without a step-up (amr mfa) or a TOTP code",
        await c.post("/io-job", json=body, headers=bearer(no_mfa)),
        401,
        "mfa-required",
    )
    reader = d.token("alice", "read:reports")
    admin = d.token("root", "read:reports", roles=["admin"])
    d.expect(
        "GET /admin/report without role admin",
        await c.get("/admin/report", headers=bearer(reader)),
        403,
        "forbidden-role",
    )
    d.expect(
        "GET /admin/report as an admin", await c.get("/admin/report", headers=bearer(admin)), 200
    )
    d.expect(
        "GET /internal/status from 127.0.0.1, X-Forwarded-For: 10.0.0.7 (not a trusted proxy)",
        await c.get("/internal/status", headers={"X-Forwarded-For": "10.0.0.7"}),
        403,
        "ip-not-allowed",
    )


async def io_job(d: Demo) -> None:
    """The io-job route: credits, idempotency, rate limit headers."""
    print("io-job: credits (402), Idempotency-Key (400, replay, 409, 422)")
    c = d.client
    body = {"resource_id": "r1"}
    carol = d.token("carol", "run:io_jobs", roles=["io_job_runner"], mfa=True)
    d.expect(
        "POST /io-job without an Idempotency-Key",
        await c.post("/io-job", json=body, headers=bearer(carol)),
        400,
        "idempotency-key-missing",
    )
    d.expect(
        "POST /io-job with a zero balance",
        await c.post("/io-job", json=body, headers=bearer(carol, **{"Idempotency-Key": new_key()})),
        402,
        "insufficient-credits",
    )
    alice = d.token("alice", "run:io_jobs", roles=["io_job_runner"], mfa=True)
    await credits.grant(d.store, d.user("alice"), 1)
    k1 = bearer(alice, **{"Idempotency-Key": new_key()})
    first = d.expect(
        "POST /io-job after `credits grant alice 1`",
        await c.post("/io-job", json=body, headers=k1),
        200,
        header="RateLimit",
    )
    replay = await _settled(c, "/io-job", body, k1)
    balance = await credits.show(d.store, d.user("alice"))
    d.expect(
        f"POST /io-job again with the same key: replayed, not charged (balance {balance.total})",
        replay,
        200,
        header="Idempotent-Replayed",
        check=replay.json() == first.json() and balance.total == 0,
    )
    d.expect(
        "POST /io-job with the same key and another body",
        await c.post("/io-job", json={"resource_id": "r2"}, headers=k1),
        422,
        "idempotency-key-reused",
    )
    dave = d.token("dave", "run:io_jobs", roles=["io_job_runner"], mfa=True)
    await credits.grant(d.store, d.user("dave"), 2)
    same = bearer(dave, **{"Idempotency-Key": new_key()})
    both = await asyncio.gather(
        c.post("/io-job", json=body, headers=same), c.post("/io-job", json=body, headers=same)
    )
    by_status = {r.status_code: r for r in both}
    d.expect("POST /io-job twice at once with one key: one runs", by_status.get(200, both[0]), 200)
    d.expect(
        "... the other is told the first is in flight",
        by_status.get(409, both[1]),
        409,
        "idempotency-in-flight",
    )


async def _settled(
    c: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    """Repeat a request the way a client should: a 409 (still in flight) means retry shortly."""
    for _ in range(20):
        response = await c.post(path, json=body, headers=headers)
        if response.status_code != 409:
            return response
        await asyncio.sleep(0.05)
    return response


async def user_profile(d: Demo) -> None:
    """The user-profile route: per-caller cache."""
    print("user profile: cache per caller")
    c = d.client
    alice, bob = d.token("alice", "read:user"), d.token("bob", "read:user")
    first = await c.get("/user/42", headers=bearer(alice))
    d.expect("GET /user/42 as alice", first, 200)
    again = await c.get("/user/42", headers=bearer(alice))
    d.expect(
        "GET /user/42 as alice again: from the cache (handler not run)",
        again,
        200,
        header="X-Cache",
        check=again.json()["served"] == first.json()["served"],
    )
    other = await c.get("/user/42", headers=bearer(bob))
    d.expect(
        "GET /user/42 as bob: his own entry, never alice's",
        other,
        200,
        check=other.json()["viewer"] == d.user("bob"),
    )
    d.expect(
        "GET /user/42 without scope read:user",
        await c.get("/user/42", headers=bearer(d.token("bob", "search"))),
        403,
        "insufficient-scope",
    )


async def limits(d: Demo) -> None:
    """Rate limits: sliding window, concurrency, per address on a public route."""
    print("limits: sliding window, concurrency, per client address")
    c = d.client
    erin = d.token("erin", "search", "read:reports")
    for i in range(3):
        d.expect(
            f"GET /search #{i + 1} of 3 per 10 s", await c.get("/search", headers=bearer(erin)), 200
        )
    d.expect(
        "GET /search #4",
        await c.get("/search", headers=bearer(erin)),
        429,
        "rate-limited",
        "Retry-After",
    )
    both = await asyncio.gather(
        c.get("/reports/render", headers=bearer(erin)),
        c.get("/reports/render", headers=bearer(erin)),
    )
    statuses = sorted(r.status_code for r in both)
    d.expect(
        "GET /reports/render twice at once: one renders",
        both[0],
        both[0].status_code,
        check=statuses == [200, 429],
    )
    refused = next((r for r in both if r.status_code == 429), both[1])
    d.expect("... the other is over the concurrency cap", refused, 429, "concurrency-limited")
    answers = [await c.get("/status") for _ in range(6)]
    codes = [r.status_code for r in answers]
    allowed = codes.count(200)
    d.expect(
        f"GET /status six times from one address: {allowed} allowed",
        answers[-1],
        429,
        "rate-limited",
        "RateLimit-Policy",
        check=codes == sorted(codes) and allowed <= 5,
    )


async def totp(d: Demo) -> None:
    """MFA with a TOTP code, each code accepted once."""
    print("mfa: TOTP code in X-TOTP-Code, accepted once")
    c = d.client
    frank = d.token("frank", "payouts:write")
    d.expect(
        "POST /payouts without a code",
        await c.post("/payouts", json={"amount": 5}, headers=bearer(frank)),
        401,
        "mfa-required",
    )
    enrolment = await enrol(d.store, d.user("frank"))
    code = pyotp.TOTP(enrolment.secret).now()
    headers = bearer(frank, **{"X-TOTP-Code": code})
    d.expect(
        "POST /payouts with a fresh code (after `policyroute mfa enrol frank`)",
        await c.post("/payouts", json={"amount": 5}, headers=headers),
        200,
    )
    d.expect(
        "POST /payouts with the same code again",
        await c.post("/payouts", json={"amount": 5}, headers=headers),
        401,
        "mfa-invalid",
    )


def _from_address(d: Demo, address: str) -> httpx.AsyncClient:
    """A client of the example whose connections come from another loopback address."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=d.client.base_url, transport=transport, timeout=10.0)


async def brute_force(d: Demo) -> None:
    """settings.auth.lockout: refused tokens block their address; a subject only where it failed."""
    print("lockout: 10 refused tokens block an address; a subject only where it failed for it")
    host = d.client.base_url.host
    if not (host == "localhost" or ipaddress.ip_address(host).is_loopback):
        print("  skip (the blocked addresses are loopback ones: run the demo on the server's host)")
        return
    # Fresh loopback addresses per run, so a run never meets an earlier run's blocks, and
    # 127.0.0.1 (yours, and the rest of the demo's) is never blocked.
    net = f"127.{secrets.randbelow(250) + 2}.{secrets.randbelow(250) + 2}"
    other_key = RSAKey.generate_key(2048, parameters={"kid": DEV_KID})
    admin = d.token("root", "read:reports", roles=["admin"])
    # Ten accounts tried once each (credential stuffing): no subject reaches the limit,
    # the address does.
    forged = [mint(other_key, d.user(f"guess{i}"), roles=["admin"]) for i in range(10)]
    async with _from_address(d, f"{net}.1") as c:
        refused = [await c.get("/admin/report", headers=bearer(f)) for f in forged]
        d.expect(
            f"GET /admin/report from {net}.1 with 10 tokens (10 users) signed by another key",
            refused[-1],
            401,
            "invalid-token",
            check=all(r.status_code == 401 for r in refused),
        )
        d.expect(
            f"... then a valid admin token from {net}.1: the address is blocked",
            await c.get("/admin/report", headers=bearer(admin)),
            429,
            "auth-locked",
            "Retry-After",
        )
    d.expect(
        "the same valid token from 127.0.0.1",
        await d.client.get("/admin/report", headers=bearer(admin)),
        200,
    )
    victim = d.token("victor", "read:reports", roles=["admin"])
    posing = mint(other_key, d.user("victor"), scopes=["read:reports"], roles=["admin"])
    failed = []
    for i in range(10):
        async with _from_address(d, f"{net}.{20 + i}") as c:
            failed.append(await c.get("/admin/report", headers=bearer(posing)))
    d.expect(
        f"10 addresses ({net}.20-29) each send one forged token of victor",
        failed[-1],
        401,
        "invalid-token",
        check=all(r.status_code == 401 for r in failed),
    )
    async with _from_address(d, f"{net}.20") as c:
        d.expect(
            f"... victor's own valid token from {net}.20: blocked for victor there",
            await c.get("/admin/report", headers=bearer(victim)),
            429,
            "auth-locked",
        )
        d.expect(
            f"... root's token from {net}.20: that address is not blocked for others",
            await c.get("/admin/report", headers=bearer(admin)),
            200,
        )
    d.expect(
        "... victor from 127.0.0.1, which never failed for him: not locked out",
        await d.client.get("/admin/report", headers=bearer(victim)),
        200,
    )


async def one_time_tokens(d: Demo) -> None:
    """replay: jti: a token runs one request."""
    print("replay: one-time tokens (jti accepted once)")
    c = d.client
    olga = d.token("olga", "transfers:write")
    d.expect(
        "POST /transfers with a fresh token",
        await c.post("/transfers", json={"amount": 5}, headers=bearer(olga)),
        201,
    )
    d.expect(
        "POST /transfers with the same token again",
        await c.post("/transfers", json={"amount": 5}, headers=bearer(olga)),
        401,
        "token-replayed",
        "WWW-Authenticate",
    )
    d.expect(
        "POST /transfers with a new token",
        await c.post(
            "/transfers", json={"amount": 5}, headers=bearer(d.token("olga", "transfers:write"))
        ),
        201,
    )


async def smoothing(d: Demo) -> None:
    """Throttle (a burst waits its turn) and debounce (refuse or join a repeat)."""
    print("limits: throttle and debounce")
    c = d.client
    paula = d.token("paula", "read:reports", "write:feedback")
    burst = await asyncio.gather(*(c.get("/export", headers=bearer(paula)) for _ in range(5)))
    started = sorted(r.json()["started"] for r in burst if r.status_code == 200)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(started)]
    d.expect(
        f"GET /export 5 at once (2/s, 3 may wait): 4 run, {gaps} s apart",
        burst[0],
        200,
        check=sorted(r.status_code for r in burst) == [200, 200, 200, 200, 429]
        and all(0.4 <= g <= 0.7 for g in gaps),
    )
    over = next((r for r in burst if r.status_code == 429), burst[-1])
    d.expect("... the fifth is past the queue", over, 429, "rate-limited", "Retry-After")
    form = {"text": f"great demo {d.run}"}
    d.expect(
        "POST /feedback", await c.post("/feedback", json=form, headers=bearer(paula)), 201
    )
    d.expect(
        "POST /feedback again at once (a double submit)",
        await c.post("/feedback", json=form, headers=bearer(paula)),
        429,
        "rate-limited",
        "Retry-After",
    )
    made = await asyncio.gather(
        *(c.post("/reports/generate", headers=bearer(paula)) for _ in range(3))
    )
    ids = {r.json().get("report_id") for r in made if r.status_code == 200}
    joined = sum(r.headers.get("x-debounce") == "joined" for r in made)
    d.expect(
        f"POST /reports/generate 3 at once: one report ({', '.join(sorted(ids))}), "
        f"{joined} joined it",
        made[0],
        200,
        check=len(ids) == 1 and joined == 2 and all(r.status_code == 200 for r in made),
    )


async def caching(d: Demo) -> None:
    """A cache shared by every caller, acknowledged in the policy."""
    print("cache: one copy for every caller (acknowledged)")
    c = d.client
    first = await c.get("/catalog", headers=bearer(d.token("alice", "read:catalog")))
    d.expect("GET /catalog as alice", first, 200)
    second = await c.get("/catalog", headers=bearer(d.token("bob", "read:catalog")))
    d.expect(
        "GET /catalog as bob: the same cached copy",
        second,
        200,
        header="X-Cache",
        check=second.json() == first.json(),
    )


async def events(d: Demo) -> None:
    """An event on Pulsar after a 2xx."""
    print("events: published on Pulsar after a 2xx")
    import pulsar

    c = d.client
    pulsar_client = pulsar.Client(
        d.pulsar_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error)
    )
    try:
        consumer = pulsar_client.subscribe(
            ORDERS, f"demo-{d.run}", initial_position=pulsar.InitialPosition.Latest
        )
        gina = d.token("gina", "write:orders")
        d.expect(
            "POST /orders without an Idempotency-Key",
            await c.post("/orders", json={"item": "disk", "quantity": 2}, headers=bearer(gina)),
            400,
            "idempotency-key-missing",
        )
        created = d.expect(
            "POST /orders",
            await c.post(
                "/orders",
                json={"item": "disk", "quantity": 2},
                headers=bearer(gina, **{"Idempotency-Key": new_key()}),
            ),
            201,
        )
        order_id = created.json().get("order_id") if created.status_code == 201 else None
        event = await asyncio.to_thread(_receive, consumer, order_id)
        ok = event is not None
        print(f"  {'ok  ' if ok else 'FAIL'} event on {ORDERS}: {event}", flush=True)
        if ok:
            d.passed += 1
        else:
            d.failed.append(f"no event for order {order_id} on {ORDERS}")
        consumer.close()
    finally:
        pulsar_client.close()


def _receive(consumer: Any, order_id: str | None) -> dict[str, Any] | None:
    import json

    import pulsar

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            message = consumer.receive(timeout_millis=1000)
        except pulsar.Timeout:  # nothing arrived within the second
            continue
        consumer.acknowledge(message)
        doc = json.loads(message.data())
        if doc.get("response", {}).get("order_id") == order_id:
            return {k: doc.get(k) for k in ("route", "subject", "status", "request", "response")}
    return None


async def resilience(d: Demo) -> None:
    """Retry, breaker, timeout and a named resilience profile."""
    print("resilience: retry, breaker, timeout, profile")
    c = d.client
    hank = d.token("hank", "write:orders", "read:reports", "read:catalog")
    retried = await c.post("/sync", headers=bearer(hank, **{"Idempotency-Key": new_key()}))
    d.expect(
        "POST /sync with an Idempotency-Key: two 503s retried inside, one 200",
        retried,
        200,
        check=retried.json().get("attempts") == 3,
    )
    d.expect(
        "POST /sync without a key: not safe to repeat, so not retried",
        await c.post("/sync", headers=bearer(hank)),
        503,
    )
    await _circuit_closed(c, bearer(hank))
    for i in range(2):
        d.expect(
            f"GET /upstream?fail=true #{i + 1}: the handler's 502 counts as a failure",
            await c.get("/upstream", params={"fail": "true"}, headers=bearer(hank)),
            502,
        )
    d.expect(
        "GET /upstream after two failures: the circuit is open",
        await c.get("/upstream", headers=bearer(hank)),
        503,
        "circuit-open",
        "Retry-After",
    )
    d.expect(
        "GET /slow?seconds=2 (timeout 1 s)",
        await c.get("/slow", params={"seconds": "2"}, headers=bearer(hank)),
        504,
        "handler-timeout",
    )
    d.expect("GET /slow?seconds=0", await c.get("/slow", headers=bearer(hank)), 200)
    sku = f"sku-{d.run}"
    stock = await c.get(f"/inventory/{sku}", headers=bearer(hank))
    d.expect(
        "GET /inventory/SKU: profile inventory_backend retried a refused connection",
        stock,
        200,
        check=stock.json().get("calls") == 2,
    )


async def _circuit_closed(c: httpx.AsyncClient, headers: dict[str, str]) -> None:
    """Wait out a circuit a previous run left open (it stays open for `reset`)."""
    for _ in range(10):
        response = await c.get("/upstream", headers=headers)
        if response.status_code != 503:
            return
        await asyncio.sleep(float(response.headers.get("Retry-After", "1")))


async def sealing(d: Demo, prefix: str) -> None:
    """encrypt_fields, decrypt_fields and sensitive."""
    print("data keys: encrypt_fields, decrypt_fields, sensitive")
    c = d.client
    ivy = d.token("ivy", "write:notes", "read:notes")
    secret = f"door code {d.run}"
    created = d.expect(
        "POST /notes with a secret field",
        await c.post("/notes", json={"title": "t", "secret": secret}, headers=bearer(ivy)),
        201,
    )
    note_id = created.json().get("note_id", "missing") if created.status_code == 201 else "missing"
    stored = await c.get(f"/notes/{note_id}/stored", headers=bearer(ivy))
    d.expect(
        "GET /notes/ID/stored: the handler only ever held a sealed token",
        stored,
        200,
        check=str(stored.json().get("secret", "")).startswith("PRS1."),
    )
    opened = await c.get(f"/notes/{note_id}", headers=bearer(ivy))
    d.expect(
        "GET /notes/ID: decrypted for the caller",
        opened,
        200,
        check=opened.json().get("secret") == secret,
    )
    again = await c.get(f"/notes/{note_id}", headers=bearer(ivy))
    at_rest = await _valkey_contains(d.store, prefix, secret)
    d.expect(
        "GET /notes/ID again: from a cache entry sealed at rest (no plaintext in Valkey)",
        again,
        200,
        header="X-Cache",
        check=again.json().get("secret") == secret and not at_rest,
    )


async def _valkey_contains(store: ValkeyStore, prefix: str, text: str) -> bool:
    needle = text.encode()
    cursor: Any = 0
    while True:
        cursor, keys = await store.command(
            "SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 500, operation="demo scan"
        )
        for key in keys:
            kind = await store.command("TYPE", key, operation="demo type")
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            values: list[Any] = []
            if kind == "string":
                values = [await store.command("GET", key, operation="demo get")]
            elif kind == "hash":
                values = list(await store.command("HGETALL", key, operation="demo get"))
            elif kind == "list":
                values = list(await store.command("LRANGE", key, 0, -1, operation="demo get"))
            if any(needle in v for v in values if isinstance(v, bytes)):
                return True
        if int(cursor) == 0:
            return False


async def openapi(d: Demo) -> None:
    """The policy in the OpenAPI document."""
    print("openapi: security and problem responses from the policy")
    doc = await d.client.get("/openapi.json")
    paths = doc.json()["paths"] if doc.status_code == 200 else {}
    post = paths.get("/io-job", {}).get("post", {})
    d.expect(
        "GET /openapi.json: POST /io-job needs bearer scope run:io_jobs, may answer 402/429",
        doc,
        200,
        check=post.get("security") == [{"bearer": ["run:io_jobs"]}]
        and {"401", "402", "403", "409", "422", "429"} <= set(post.get("responses", {})),
    )
    transfers = paths.get("/transfers", {}).get("post", {})
    responses = transfers.get("responses", {})
    d.expect(
        "... POST /transfers: 401 token-replayed, 429 auth-locked, x-policyroute replay: jti",
        doc,
        200,
        check="token-replayed" in responses.get("401", {}).get("description", "")
        and "auth-locked" in responses.get("429", {}).get("description", "")
        and transfers.get("x-policyroute", {}).get("replay") == "jti",
    )


async def exercise(base_url: str, valkey_url: str, pulsar_url: str, prefix: str) -> Demo:
    """Run every path against the server at `base_url`."""
    store = ValkeyStore(valkey_url, prefix=prefix)
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:
            d = Demo(client, store, pulsar_url)
            for part in (identity, io_job, user_profile, limits, totp, caching, events, resilience):
                await part(d)
            for part in (one_time_tokens, smoothing, brute_force):
                await part(d)
            await sealing(d, prefix)
            await openapi(d)
    finally:
        await store.stop()
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the example server exited with {server.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the example server did not answer within {START_TIMEOUT:.0f} s")


@contextlib.contextmanager
def example_server() -> Iterator[tuple[str, str, str]]:
    """Embedded Valkey and broker, and the example app under `policyroute run`."""
    from policyroute.backends.embedded import start_pulsar, start_valkey

    valkey = start_valkey()
    broker = start_pulsar()
    log = Path(tempfile.mkstemp(prefix="policyroute-demo-", suffix=".log")[1])
    port = _free_port()
    env = {
        **os.environ,
        "POLICYROUTE_VALKEY_URL": valkey.url,
        "POLICYROUTE_PULSAR_URL": broker.url,
    }
    for name in ("POLICYROUTE_POLICIES", "POLICYROUTE_KEY_PREFIX", "POLICYROUTE_RELOAD"):
        env.pop(name, None)
    command = [sys.executable, "-m", "policyroute.cli", "run", "examples.app:app"]
    server: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as out:
            server = subprocess.Popen(
                [*command, "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=out
            )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, server)
        except RuntimeError:
            print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        print(f"example app at {url} (Valkey {valkey.url}, broker {broker.url}; log {log})")
        yield url, valkey.url, broker.url
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        broker.stop()
        valkey.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when every path answered as expected."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", help="a running example (default: start one)")
    parser.add_argument("--valkey-url", help="its Valkey (with --url)")
    parser.add_argument("--pulsar-url", help="its broker (with --url)")
    parser.add_argument("--key-prefix", default="pr", help="its POLICYROUTE_KEY_PREFIX")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.url:
        if not args.valkey_url or not args.pulsar_url:
            parser.error("--url needs --valkey-url and --pulsar-url (printed by `make run`)")
        demo = asyncio.run(exercise(args.url, args.valkey_url, args.pulsar_url, args.key_prefix))
    else:
        with example_server() as (url, valkey_url, pulsar_url):
            demo = asyncio.run(exercise(url, valkey_url, pulsar_url, args.key_prefix))
    took = time.monotonic() - started
    print(f"\n{demo.passed} checks passed, {len(demo.failed)} failed, in {took:.1f} s")
    for failure in demo.failed:
        print(f"  FAIL {failure}", file=sys.stderr)
    return 0 if not demo.failed else 1


if __name__ == "__main__":
    sys.exit(main())
