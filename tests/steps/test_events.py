"""`events`: an event on the route's topic after each 2xx, never otherwise, never holding a response."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi import FastAPI

import policyroute
from policyroute.admin import credits
from policyroute.crypto import Keyring
from policyroute.errors import ConfigError, Problems

from ..events.kit import (
    Listener,
    dead_pulsar_url,
    install,
    outbox_entries,
    running,
    topic,
    wait_for_outbox,
)
from .identity_kit import SETTINGS, bearer, subject, token


def jobs_policy(topic_name: str, extra: str = "") -> str:
    """POST /jobs: scoped, idempotent, with events carrying chosen fields."""
    return f"""\
version: 1
{SETTINGS}routes:
  POST /jobs:
    scopes: [jobs:run]
    idempotency: {{header: Idempotency-Key, ttl: 60s}}
    events:
      topic: {topic_name}
      fields:
        request: [name, meta.kind, absent]
        response: [job]
{extra}"""


async def test_a_2xx_publishes_the_envelope_with_chosen_fields(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    t = topic("jobs")
    app, _ = install(policy_dir, jobs_policy(t), valkey_url=valkey_url, pulsar_url=pulsar_url)
    who = subject()
    body = {"name": "n1", "meta": {"kind": "batch"}, "password": "hunter2"}
    async with Listener(pulsar_url, t) as listener:
        async with running(app) as c:
            before = datetime.now(UTC)
            r = await c.post(
                "/jobs",
                json=body,
                headers={**bearer(token(who, scopes=["jobs:run"])), "X-Request-Id": "req-42"},
            )
            assert r.status_code == 201
        [message] = await listener.take(1)
    event = json.loads(message.data())
    assert set(event) == {
        "id",
        "route",
        "subject",
        "request_id",
        "time",
        "status",
        "request",
        "response",
    }
    assert len(event["id"]) == 32 and message.properties()["event_id"] == event["id"]
    assert event["route"] == "POST /jobs"
    assert event["subject"] == who
    assert event["request_id"] == "req-42"
    assert event["status"] == 201
    assert event["request"] == {"name": "n1", "meta.kind": "batch"}  # absent field omitted
    assert event["response"] == {"job": r.json()["job"]}
    assert event["time"].endswith("Z")
    sent = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
    assert before.replace(microsecond=0) <= sent <= datetime.now(UTC)


async def test_no_event_on_4xx_5xx_denials_or_idempotent_replay(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    t = topic("only-2xx")
    app, _ = install(policy_dir, jobs_policy(t), valkey_url=valkey_url, pulsar_url=pulsar_url)
    allowed = bearer(token(subject(), scopes=["jobs:run"]))
    async with Listener(pulsar_url, t) as listener:
        async with running(app) as c:
            assert (await c.post("/jobs?status=422", json={}, headers=allowed)).status_code == 422
            assert (await c.post("/jobs?status=503", json={}, headers=allowed)).status_code == 503
            assert (await c.post("/jobs", json={})).status_code == 401
            no_scope = bearer(token(subject(), scopes=["other"]))
            assert (await c.post("/jobs", json={}, headers=no_scope)).status_code == 403
            key = {**allowed, "Idempotency-Key": "k-1", "X-Request-Id": "first"}
            first = await c.post("/jobs", json={"name": "once"}, headers=key)
            replay = await c.post("/jobs", json={"name": "once"}, headers=key)
            assert first.status_code == replay.status_code == 201
            assert replay.json() == first.json()
            marker = {**allowed, "X-Request-Id": "marker"}
            assert (await c.post("/jobs", json={}, headers=marker)).status_code == 201
        messages = await listener.take(3, wait=1.5)
    assert [json.loads(m.data())["request_id"] for m in messages] == ["first", "marker"]


async def test_the_response_is_not_held_while_the_broker_cannot_take_the_event(
    policy_dir: Path, valkey_url: str
) -> None:
    """With the broker away, each publication would block for the send timeout (2 s);
    responses come back at once and the events wait in the outbox."""
    t = topic("unheld")
    policy = f"version: 1\nroutes:\n  POST /jobs:\n    public: true\n    events: {{topic: {t}}}\n"
    app, engine = install(
        policy_dir,
        policy,
        valkey_url=valkey_url,
        pulsar_url=dead_pulsar_url(),
        events_send_timeout=2.0,
        events_flush_timeout=1.0,
    )
    async with running(app) as c:
        started = time.perf_counter()
        for i in range(10):
            r = await c.post("/jobs", json={"i": i})
            assert r.status_code == 201
        elapsed = time.perf_counter() - started
        assert elapsed < 1.0, f"10 responses took {elapsed:.2f}s: publication held them"
        assert await outbox_entries(engine) == []  # still trying the broker
        entries = await wait_for_outbox(engine, 10, wait=8.0)
    assert len(entries) == 10
    events = [json.loads(json.loads(fields[b"event"])["payload"]) for _, fields in entries]
    assert {e["route"] for e in events} == {"POST /jobs"}
    assert len({e["id"] for e in events}) == 10


async def test_an_event_failing_max_attempts_times_lands_on_the_dlq(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    """A 6 MB event is refused by its topic (MessageTooBig) every time; after max_attempts
    it goes to the DLQ topic, whose producer compresses (and chunks) large messages."""
    t, dlq = topic("big"), topic("big-dlq")
    policy = f"""\
version: 1
routes:
  GET /big:
    public: true
    events:
      topic: {t}
      dlq: {dlq}
      max_attempts: 3
      fields: {{response: [blob, n]}}
"""
    app, engine = install(
        policy_dir,
        policy,
        valkey_url=valkey_url,
        pulsar_url=pulsar_url,
        events_max_body=8 << 20,
        outbox_poll=0.1,
    )
    async with Listener(pulsar_url, t) as main, Listener(pulsar_url, dlq) as dead:
        async with running(app) as c:
            r = await c.get("/big", params={"size": 6_000_000}, headers={"X-Request-Id": "big-1"})
            assert r.status_code == 200
            [message] = await dead.take(1, wait=15.0)
            assert await outbox_entries(engine) == []
        assert await main.take(1, wait=0.5) == []
    event = json.loads(message.data())
    assert event["request_id"] == "big-1" and len(event["response"]["blob"]) == 6_000_000
    props = message.properties()
    assert props["event_id"] == event["id"]
    assert props["policyroute_error"] == "MessageTooBig"
    assert props["policyroute_attempts"] == "3"
    assert props["policyroute_origin_topic"] == t


async def test_shutdown_flushes_pending_events(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    t = topic("flush")
    policy = f"version: 1\nroutes:\n  POST /jobs:\n    public: true\n    events: {{topic: {t}}}\n"
    app, engine = install(policy_dir, policy, valkey_url=valkey_url, pulsar_url=pulsar_url)
    n = 300
    async with Listener(pulsar_url, t) as listener:
        async with running(app) as c:
            replies = await asyncio.gather(
                *(c.post("/jobs", json={}, headers={"X-Request-Id": f"r{i}"}) for i in range(n))
            )
            assert {r.status_code for r in replies} == {201}
        # the lifespan has ended: whatever was still queued was published by shutdown
        messages = await listener.take(n, wait=10.0)
    assert {json.loads(m.data())["request_id"] for m in messages} == {f"r{i}" for i in range(n)}
    assert await outbox_entries(engine) == []


async def test_shutdown_saves_unpublished_events_to_the_outbox_and_a_later_process_relays_them(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    t = topic("saved")
    policy = f"version: 1\nroutes:\n  POST /jobs:\n    public: true\n    events: {{topic: {t}}}\n"
    app, engine = install(
        policy_dir,
        policy,
        valkey_url=valkey_url,
        pulsar_url=dead_pulsar_url(),
        events_send_timeout=5.0,
        events_flush_timeout=0.5,
    )
    async with running(app) as c:
        for i in range(20):
            assert (await c.post("/jobs", json={}, headers={"X-Request-Id": f"s{i}"})).is_success
    # Saved by the time shutdown ends (whether the failing sends or the shutdown moved them).
    assert len(await outbox_entries(engine)) == 20
    # Another process, same Valkey, broker reachable: its relay publishes the saved events.
    second, _ = install(
        policy_dir,
        policy,
        valkey_url=valkey_url,
        pulsar_url=pulsar_url,
        key_prefix=engine.config.key_prefix,
        outbox_poll=0.1,
    )
    async with Listener(pulsar_url, t) as listener, running(second):
        messages = await listener.take(20, wait=10.0)
    assert {json.loads(m.data())["request_id"] for m in messages} == {f"s{i}" for i in range(20)}
    assert await outbox_entries(engine) == []


async def test_a_sensitive_route_keeps_only_ciphertext_in_the_outbox(
    policy_dir: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = Keyring.generate("k1")
    monkeypatch.setenv("POLICYROUTE_DATA_KEYS", spec)
    t = topic("sensitive")
    policy = f"""\
version: 1
routes:
  POST /jobs:
    public: true
    sensitive: true
    events: {{topic: {t}, fields: {{request: [card], response: [echo]}}}}
"""
    app, engine = install(
        policy_dir,
        policy,
        valkey_url=valkey_url,
        pulsar_url=dead_pulsar_url(),
        events_send_timeout=1.0,
        events_flush_timeout=0.5,
    )
    card = "4111-1111-1111-1111"
    async with running(app) as c:
        r = await c.post("/jobs", json={"card": card}, headers={"X-Request-Id": "rid-secret"})
        assert r.status_code == 201
        [(_, fields)] = await wait_for_outbox(engine, 1, wait=5.0)
    stored = b"".join(fields.values())
    for plain in (card.encode(), b"rid-secret", b"4111", b'"request"'):
        assert plain not in stored
    assert Keyring.is_sealed(fields[b"event"]) and fields[b"sealed"] == b"1"
    key = engine.services["valkey"].key("outbox", "events").encode()
    record = json.loads(Keyring.parse(spec).open(fields[b"event"], key))
    assert json.loads(record["payload"])["request"] == {"card": card}


def test_a_sensitive_route_with_events_and_no_keyring_is_a_config_error(
    policy_dir: Path, valkey_url: str, pulsar_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POLICYROUTE_DATA_KEYS", raising=False)
    policy = (
        "version: 1\nroutes:\n  POST /jobs:\n    public: true\n    sensitive: true\n"
        f"    events: {{topic: {topic('nokey')}}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        install(policy_dir, policy, valkey_url=valkey_url, pulsar_url=pulsar_url)
    assert "keyring" in str(caught.value) and "POLICYROUTE_DATA_KEYS" in str(caught.value)


def test_events_without_a_broker_url_is_a_config_error(policy_dir: Path, valkey_url: str) -> None:
    policy = (
        "version: 1\nroutes:\n  POST /jobs:\n    public: true\n"
        f"    events: {{topic: {topic('nourl')}}}\n"
    )
    (policy_dir / "routes.yaml").write_text(policy)
    with pytest.raises(ConfigError, match="POLICYROUTE_PULSAR_URL"):
        policyroute.install(
            FastAPI(),
            policy_dir,
            settings=policyroute.Settings(valkey_url=valkey_url),
        )


async def test_a_retried_request_publishes_once_and_is_charged_once(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    t = topic("flaky")
    policy = f"""\
version: 1
routes:
  POST /flaky:
    public: true
    credits: {{cost: 1}}
    idempotency: {{}}
    retry: {{attempts: 3, initial: 10ms, max: 20ms}}
    events: {{topic: {t}, fields: {{response: [done]}}}}
"""
    app, engine = install(policy_dir, policy, valkey_url=valkey_url, pulsar_url=pulsar_url)
    async with Listener(pulsar_url, t) as listener:
        async with running(app) as c:
            store = engine.services["valkey"]
            await credits.set_balance(store, "127.0.0.1", 5, ip=True)
            r = await c.post("/flaky?fail=2", json={}, headers={"Idempotency-Key": "f-1"})
            assert r.status_code == 201 and r.json() == {"done": 3}  # third attempt
            replay = await c.post("/flaky?fail=2", json={}, headers={"Idempotency-Key": "f-1"})
            assert replay.headers["idempotent-replayed"] == "true"
            assert (await credits.show(store, "127.0.0.1", ip=True)).total == 4
        messages = await listener.take(2, wait=3.0)
    assert [json.loads(m.data())["response"] for m in messages] == [{"done": 3}]


async def test_a_field_path_only_ever_names_the_nested_value(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    """`order.amount` is the `amount` of `order`, which the handler reads; a top-level key
    spelled "order.amount" in the body is never what the event reports."""
    t = topic("paths")
    policy = f"""\
version: 1
routes:
  POST /jobs:
    public: true
    events: {{topic: {t}, fields: {{request: [order.amount], response: [echo.order.amount]}}}}
"""
    app, _ = install(policy_dir, policy, valkey_url=valkey_url, pulsar_url=pulsar_url)
    forged = {"order.amount": 1, "order": {"amount": 1000}}
    async with Listener(pulsar_url, t) as listener:
        async with running(app) as c:
            for body in (forged, {"order.amount": 1}):
                assert (await c.post("/jobs", json=body)).status_code == 201
        first, second = [json.loads(m.data()) for m in await listener.take(2)]
    assert first["request"] == {"order.amount": 1000}
    assert first["response"] == {"echo.order.amount": 1000}
    assert second["request"] == {} and second["response"] == {}


async def test_request_fields_of_a_body_past_events_max_body_are_left_out_and_it_streams_on(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    t = topic("big-request")
    app, _ = install(
        policy_dir, jobs_policy(t), valkey_url=valkey_url, pulsar_url=pulsar_url,
        events_max_body=64,
    )  # fmt: skip
    allowed = bearer(token(subject(), scopes=["jobs:run"]))
    big = json.dumps({"name": "big", "pad": "x" * 200}).encode()

    async def chunks(body: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(body), 16):
            yield body[i : i + 16]

    async with Listener(pulsar_url, t) as listener:
        async with running(app) as c:
            # Sent without a Content-Length: read up to 64 bytes, then handed on whole.
            over = await c.post("/jobs", content=chunks(big), headers=allowed)
            small = await c.post("/jobs", content=chunks(b'{"name": "s"}'), headers=allowed)
        first, second = await listener.take(2)
    assert over.status_code == small.status_code == 201
    assert over.json()["echo"] == json.loads(big)
    assert json.loads(first.data())["request"] == {}
    assert json.loads(second.data())["request"] == {"name": "s"}


async def test_a_request_body_nested_too_deep_is_400_and_logs_no_traceback(
    policy_dir: Path, valkey_url: str, pulsar_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    t = topic("deep")
    app, _ = install(policy_dir, jobs_policy(t), valkey_url=valkey_url, pulsar_url=pulsar_url)
    allowed = {**bearer(token(subject(), scopes=["jobs:run"])), "content-type": "application/json"}
    async with Listener(pulsar_url, t) as listener:
        async with running(app) as c:
            deep = []
            for d in (1000, 5000, 100_000):
                body = b'{"name": %s}' % (b"[" * d + b"]" * d)
                deep.append(await c.post("/jobs", content=body, headers=allowed))
            shallow = await c.post("/jobs", content=b'{"name": [[["x"]]]}', headers=allowed)
            # Readable, but too deep a field for an event: the event goes without it.
            body = b'{"name": %s, "meta": {"kind": "k"}}' % (b"[" * 150 + b"]" * 150)
            left_out = await c.post("/jobs", content=body, headers=allowed)
        first, second = await listener.take(2, wait=1.5)
    for answer in deep:
        assert answer.status_code == 400
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["type"] == Problems.INVALID_BODY.uri
    assert shallow.status_code == left_out.status_code == 201
    assert json.loads(first.data())["request"] == {"name": [[["x"]]]}
    assert json.loads(second.data())["request"] == {"meta.kind": "k"}
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
