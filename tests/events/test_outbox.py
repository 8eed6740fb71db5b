"""The outbox keeps every event through a broker outage; the relay delivers each one, same id."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import valkey.asyncio
import valkey.exceptions

from policyroute.backends.embedded import start_pulsar, start_valkey
from policyroute.events.outbox import GROUP

from .kit import (
    Listener,
    dead_pulsar_url,
    eventually,
    install,
    outbox_entries,
    running,
    topic,
    wait_for_outbox,
)


async def _calls(c: httpx.AsyncClient, numbers: range, batch: int = 50) -> None:
    for start in range(numbers.start, numbers.stop, batch):
        replies = await asyncio.gather(
            *(
                c.post("/jobs", json={"n": i}, headers={"X-Request-Id": f"r{i}"})
                for i in range(start, min(start + batch, numbers.stop))
            )
        )
        assert {r.status_code for r in replies} == {201}


async def test_1000_calls_through_a_broker_outage_lose_no_event(
    policy_dir: Path, valkey_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = start_pulsar(tmp_path / "broker")
    t = topic("outage")
    policy = (
        "version: 1\nroutes:\n  POST /jobs:\n    public: true\n"
        f"    events: {{topic: {t}, fields: {{request: [n]}}}}\n"
    )
    app, engine = install(
        policy_dir,
        policy,
        valkey_url=valkey_url,
        pulsar_url=broker.url,
        events_send_timeout=1.0,
        events_flush_timeout=2.0,
        outbox_poll=0.1,
    )
    try:
        async with Listener(broker.url, t) as listener, running(app) as c:
            await _calls(c, range(0, 300))
            broker.stop()
            await _calls(c, range(300, 700))
            # the broker is away: at least those 400 events wait in the Valkey outbox
            assert len(await wait_for_outbox(engine, 400, wait=10.0)) >= 400
            broker.restart()  # at its old address, as a real broker comes back
            await _calls(c, range(700, 1000))
            messages = await listener.until(
                lambda got: (
                    {json.loads(m.data())["request_id"] for m in got}
                    >= {f"r{i}" for i in range(1000)}
                ),
                wait=30.0,
            )
            assert await outbox_entries(engine) == []
    finally:
        broker.stop()
    ids: dict[str, set[str]] = defaultdict(set)
    for message in messages:
        event = json.loads(message.data())
        assert message.properties()["event_id"] == event["id"]
        assert event["request"] == {"n": int(event["request_id"][1:])}
        ids[event["request_id"]].add(event["id"])
    assert set(ids) == {f"r{i}" for i in range(1000)}  # none lost
    # at least once: a copy published twice (sent before the outage, then from the outbox)
    # carries the same event id
    assert all(len(event_ids) == 1 for event_ids in ids.values())


async def test_with_broker_and_valkey_down_events_wait_in_memory_until_valkey_returns(
    policy_dir: Path, tmp_path: Path
) -> None:
    valkey = start_valkey()
    t = topic("both-down")
    policy = f"version: 1\nroutes:\n  POST /jobs:\n    public: true\n    events: {{topic: {t}}}\n"
    app, engine = install(
        policy_dir,
        policy,
        valkey_url=valkey.url,
        pulsar_url=dead_pulsar_url(),
        events_send_timeout=1.0,
        events_flush_timeout=5.0,
    )
    try:
        async with running(app) as c:
            valkey.stop()
            await _calls(c, range(0, 20))  # responses are unaffected
            bus = engine.services["pulsar"]
            # every publication failed; saving fails and is retried
            assert await eventually(lambda: bus.unsaved == 20)
            valkey.restart()
            entries = await wait_for_outbox(engine, 20, wait=10.0)
    finally:
        valkey.stop()
    events = [json.loads(json.loads(fields[b"event"])["payload"]) for _, fields in entries]
    assert sorted(e["request_id"] for e in events) == sorted(f"r{i}" for i in range(20))
    assert bus.dropped == 0 and bus.unsaved == 0


async def test_entries_a_crashed_worker_left_pending_are_claimed_by_another_relay(
    policy_dir: Path, valkey_url: str, pulsar_url: str
) -> None:
    t = topic("claimed")
    policy = f"version: 1\nroutes:\n  POST /jobs:\n    public: true\n    events: {{topic: {t}}}\n"
    first, engine = install(
        policy_dir,
        policy,
        valkey_url=valkey_url,
        pulsar_url=dead_pulsar_url(),
        events_flush_timeout=0.3,
    )
    async with running(first) as c:
        await _calls(c, range(0, 20))
    assert len(await outbox_entries(engine)) == 20
    # A worker reads every entry into its pending list, then dies before publishing any.
    key = engine.services["valkey"].key("outbox", "events")
    raw = valkey.asyncio.from_url(valkey_url)  # type: ignore[no-untyped-call]
    try:
        with contextlib.suppress(valkey.exceptions.ResponseError):  # BUSYGROUP
            await raw.xgroup_create(key, GROUP, id="0", mkstream=True)
        await raw.xreadgroup(GROUP, "crashed-worker", {key: ">"}, count=100)
        pending = await raw.xpending(key, GROUP)
    finally:
        await raw.aclose()
    assert pending["pending"] == 20
    second, _ = install(
        policy_dir,
        policy,
        valkey_url=valkey_url,
        pulsar_url=pulsar_url,
        key_prefix=engine.config.key_prefix,
        outbox_poll=0.1,
        outbox_claim_idle=0.5,
    )
    async with Listener(pulsar_url, t) as listener, running(second):
        messages = await listener.take(20, wait=10.0)
    assert {json.loads(m.data())["request_id"] for m in messages} == {f"r{i}" for i in range(20)}
    assert await outbox_entries(engine) == []
