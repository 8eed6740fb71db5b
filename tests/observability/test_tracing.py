"""OpenTelemetry: one span per request, a child per step that works, decisions as attributes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

import policyroute
from policyroute.admin.credits import set_balance
from policyroute.backends.valkey import ValkeyStore
from policyroute.events.consumer import Message, Worker
from policyroute.observability import tracing
from tests.events.kit import topic

from .canary import recording
from .kit import bearer, install, make_app, running, sample, token, untraced, write

STATEFUL = """\
  GET /items/{item}:
    scopes: [read]
    rate_limit: {key: user, capacity: 100, per: 60s}
    credits: {cost: 1}
    cache: {ttl: 60s}
"""


def ours(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    """policyroute's spans only (FastAPI makes its own server spans too)."""
    scope = "policyroute"
    return [s for s in spans if s.instrumentation_scope and s.instrumentation_scope.name == scope]


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    """The spans with a name."""
    return [s for s in spans if s.name == name]


async def _fund(valkey_url: str, engine: Any, subject: str, amount: int) -> None:
    store = ValkeyStore(valkey_url, prefix=engine.config.key_prefix)
    try:
        await set_balance(store, subject, amount)
    finally:
        await store.stop()


async def test_one_span_per_request_and_a_child_per_step_that_did_work(
    policy_dir: Path, valkey_url: str
) -> None:
    app, engine = install(policy_dir, STATEFUL, valkey_url=valkey_url)
    await _fund(valkey_url, engine, "alice", 10)
    auth = bearer(token("alice", scopes=["read"]))
    with recording() as spans:
        async with running(app) as c:
            first = await c.get("/items/a", headers=auth)
            second = await c.get("/items/a", headers=auth)
    assert first.status_code == second.status_code == 200
    assert second.headers["x-cache"] == "hit"
    roots = by_name(ours(spans), "GET /items/{item}")
    assert len(roots) == 2
    miss, hit = sorted(roots, key=lambda s: s.start_time or 0)
    attrs = dict(miss.attributes or {})
    assert attrs["policyroute.allowed"] is True
    assert attrs["policyroute.request_id"] == first.headers["x-request-id"]
    assert attrs["http.route"] == "/items/{item}"
    assert attrs["http.response.status_code"] == 200
    assert attrs["policyroute.rate_limit"] == "allowed"
    assert attrs["policyroute.cache"] == "miss"
    assert attrs["policyroute.credits"] == "charged"
    assert attrs["policyroute.credits.charged"] == 1
    hit_attrs = dict(hit.attributes or {})
    assert hit_attrs["policyroute.cache"] == "hit"
    assert "policyroute.credits" not in hit_attrs  # a cache hit is never charged
    # The request's span is a child of FastAPI's server span; the steps are its children.
    assert miss.kind == SpanKind.INTERNAL and miss.parent is not None
    children = [s for s in ours(spans) if s.parent and s.parent.span_id == miss.context.span_id]
    assert sorted(s.name for s in children) == ["policyroute.auth", "policyroute.state"]
    state = by_name(children, "policyroute.state")[0]
    assert dict(state.attributes or {})["policyroute.cache"] == "miss"
    assert not by_name(ours(spans), "policyroute.scopes")  # an in-memory check: no span


async def test_a_denial_names_its_reason_and_step(policy_dir: Path, valkey_url: str) -> None:
    app, _ = install(policy_dir, STATEFUL, valkey_url=valkey_url)
    with recording() as spans:
        async with running(app) as c:
            broke = await c.get("/items/b", headers=bearer(token("bob", scopes=["read"])))
            anonymous = await c.get("/items/b")
            unscoped = await c.get("/items/b", headers=bearer(token("bob")))
    assert (broke.status_code, anonymous.status_code, unscoped.status_code) == (402, 401, 403)
    roots = sorted(by_name(ours(spans), "GET /items/{item}"), key=lambda s: s.start_time or 0)
    seen = [
        (a["policyroute.allowed"], a["policyroute.denial.reason"], a["policyroute.denial.step"])
        for a in (dict(s.attributes or {}) for s in roots)
    ]
    assert seen == [
        (False, "insufficient-credits", "credits"),
        (False, "unauthenticated", "auth"),
        (False, "insufficient-scope", "scopes"),
    ]
    [refused_auth] = [
        s
        for s in by_name(ours(spans), "policyroute.auth")
        if s.parent and s.parent.span_id == roots[1].context.span_id
    ]
    assert dict(refused_auth.attributes or {})["policyroute.denied"] == "unauthenticated"


async def test_the_callers_trace_is_continued(policy_dir: Path) -> None:
    app, _ = install(policy_dir, "  GET /ping: {public: true}\n")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with recording() as spans:
        async with running(app) as c:
            r = await c.get("/ping", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert r.status_code == 200
    [root] = by_name(ours(spans), "GET /ping")
    assert format(root.context.trace_id, "032x") == trace_id


async def test_without_a_framework_span_ours_is_the_server_span_of_the_callers_trace(
    policy_dir: Path,
) -> None:
    try:
        app = make_app({}, telemetry={"tracing": False})  # FastAPI's own spans off
    except TypeError:
        pytest.skip("this FastAPI has no native telemetry to turn off")
    write(policy_dir, "  GET /ping: {public: true}\n")
    policyroute.install(app, policy_dir)
    trace_id, caller = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with recording() as spans:
        async with running(app) as c:
            r = await c.get("/ping", headers={"traceparent": f"00-{trace_id}-{caller}-01"})
            plain = await c.get("/ping")
    assert r.status_code == plain.status_code == 200
    first, second = sorted(by_name(ours(spans), "GET /ping"), key=lambda s: s.start_time or 0)
    assert first.kind == SpanKind.SERVER
    assert format(first.context.trace_id, "032x") == trace_id
    assert first.parent is not None and format(first.parent.span_id, "016x") == caller
    assert second.parent is None and format(second.context.trace_id, "032x") != trace_id


async def test_the_breaker_state_and_an_open_circuit_are_named(policy_dir: Path) -> None:
    app, _ = install(
        policy_dir, "  GET /work:\n    public: true\n    breaker: {failures: 1, reset: 30s}\n"
    )
    with recording() as spans:
        async with running(app) as c:
            failed = await c.get("/work?status=500")
            refused = await c.get("/work")
    assert (failed.status_code, refused.status_code) == (500, 503)
    first, second = sorted(by_name(ours(spans), "GET /work"), key=lambda s: s.start_time or 0)
    assert dict(first.attributes or {})["policyroute.breaker"] == "open"
    attrs = dict(second.attributes or {})
    assert attrs["policyroute.denial.reason"] == "circuit-open"
    assert attrs["policyroute.denial.step"] == "resilience"
    assert attrs["policyroute.breaker"] == "open"


async def test_without_an_sdk_no_span_is_made_and_metrics_still_count(policy_dir: Path) -> None:
    app, _ = install(policy_dir, "  GET /ping: {public: true}\n")
    before = sample(
        "policyroute_requests_total",
        route="GET /ping",
        method="GET",
        outcome="allowed",
        status="2xx",
    )
    with untraced(), recording() as spans:
        assert tracing.active() is None
        async with running(app) as c:
            r = await c.get("/ping")
    assert r.status_code == 200 and r.headers["x-request-id"]
    assert ours(spans) == []
    after = sample(
        "policyroute_requests_total",
        route="GET /ping",
        method="GET",
        outcome="allowed",
        status="2xx",
    )
    assert after == before + 1
    assert tracing.active() is not None  # the suite's SDK provider again


async def test_trace_context_reaches_the_event_and_the_consumer_span(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    t = topic("traced")
    app, _ = install(
        policy_dir,
        f"  POST /jobs:\n    public: true\n    events: {{topic: '{t}'}}\n",
        valkey_url=valkey_url,
        pulsar_url=pulsar_url,
    )
    got: list[Message] = []
    done = asyncio.Event()
    worker = Worker()

    @worker.consumer(t, subscription="traced", initial_position="earliest")
    async def handle(message: Message) -> None:
        got.append(message)
        done.set()

    with recording() as spans:
        await worker.start(pulsar_url)
        try:
            async with running(app) as c:
                r = await c.post("/jobs", json={"name": "x"}, headers={"x-request-id": "job-42"})
            await asyncio.wait_for(done.wait(), 15)
        finally:
            await worker.stop(grace=2)
    assert r.status_code == 201 and r.headers["x-request-id"] == "job-42"
    [message] = got
    assert "traceparent" in message.properties
    assert json.loads(message.data)["request_id"] == "job-42"  # the id of logs, spans, header
    [published] = by_name(ours(spans), "policyroute.events")
    [consumed] = [s for s in ours(spans) if s.kind == SpanKind.CONSUMER]
    assert consumed.name == f"process {t}"
    assert consumed.context.trace_id == published.context.trace_id
    assert consumed.parent is not None and consumed.parent.span_id == published.context.span_id
    assert dict(consumed.attributes or {})["messaging.message.id"] == message.event_id


async def test_a_script_flushed_between_requests_is_reloaded_inside_a_traced_request(
    policy_dir: Path, valkey_url: str
) -> None:
    # Every script call after the flush meets NOSCRIPT and reloads the script; an
    # idempotency record's owner awaits its finish call inside the response. On the
    # compiled build, a reload awaited inside its `except` once let the caught NOSCRIPT
    # resurface from the request's span: a 500 after the 201. Now each request answers
    # once, and its record is there for the retry.
    jobs = """\
  POST /jobs:
    idempotency: {required: true}
    rate_limit: [{key: user, capacity: 100, per: 60s}, {key: user, capacity: 1, per: 60s, enforce: false}]
    credits: {cost: 1}
"""
    app, engine = install(policy_dir, jobs, valkey_url=valkey_url)
    await _fund(valkey_url, engine, "alice", 10)
    auth = bearer(token("alice"))
    store = ValkeyStore(valkey_url, prefix=engine.config.key_prefix)
    try:
        with recording() as spans:
            async with running(app) as c:
                first = await c.post("/jobs", json={"name": "a"}, headers={**auth, "Idempotency-Key": "k-1"})
                await store.command("SCRIPT", "FLUSH", operation="test")
                after = {**auth, "Idempotency-Key": "k-2"}
                second = await c.post("/jobs", json={"name": "b"}, headers=after)
                retry = await c.post("/jobs", json={"name": "b"}, headers=after)
    finally:
        await store.stop()
    assert [r.status_code for r in (first, second, retry)] == [first.status_code] * 3
    assert first.status_code < 300 and retry.headers.get("idempotent-replayed") == "true"
    roots = by_name(ours(spans), "POST /jobs")
    codes = [dict(s.attributes or {}).get("http.response.status_code") for s in roots]
    assert codes == [first.status_code] * 3
