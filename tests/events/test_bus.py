"""The event bus of a served app: a process that stops while its broker is away."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import valkey

from policyroute.backends.valkey import ValkeyStore
from policyroute.events.outbox import Outbox
from tests.faults.proxy import FaultProxy
from tests.servers import REPO, policyroute_run

from .kit import dead_pulsar_url, topic

SERVED_APP = """\
from fastapi import FastAPI, Request

import policyroute

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@app.post("/jobs", status_code=201)
async def jobs(request: Request) -> dict[str, object]:
    return {"job": await request.json()}


policyroute.install(app)
"""

EVENTS = 5


@pytest.mark.parametrize(
    ("stop", "codes"),
    [
        ((signal.SIGTERM,), {128 + signal.SIGTERM}),
        ((signal.SIGINT,), {0}),
        # Two Ctrl+Cs at once: uvicorn quits without the app's shutdown (its lifespan is
        # skipped), so the events still in flight are saved at the process's exit.
        ((signal.SIGINT, signal.SIGINT), {0, 128 + signal.SIGINT, -signal.SIGINT}),
    ],
    ids=["SIGTERM", "SIGINT", "SIGINT-twice"],
)
async def test_policyroute_run_with_an_unreachable_broker_stops_normally_and_keeps_its_events(
    tmp_path: Path, valkey_url: str, stop: tuple[signal.Signals, ...], codes: set[int]
) -> None:
    # The native client retries its connections, and the producer of the route's topic is
    # still being created, when the signal comes. The process must end as with the
    # embedded backends (never SIGABRT: "terminate called without an active exception"),
    # and every event stays in the Valkey outbox for the next process's relay.
    (tmp_path / "served_jobs.py").write_text(SERVED_APP)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "routes.yaml").write_text(
        "version: 1\nroutes:\n  GET /ping:\n    public: true\n  POST /jobs:\n    public: true\n"
        f"    events: {{topic: '{topic('unreachable')}', fields: {{request: [n]}}}}\n"
    )
    prefix = "t" + uuid.uuid4().hex[:10]
    env = {
        "POLICYROUTE_KEY_PREFIX": prefix,
        "POLICYROUTE_EVENTS_SEND_TIMEOUT": "1",
        "POLICYROUTE_EVENTS_FLUSH_TIMEOUT": "1",
    }

    def serve_then_stop() -> tuple[list[int], int, str]:
        with policyroute_run(
            tmp_path, "served_jobs:app", policies, valkey_url, dead_pulsar_url(), env, "/ping"
        ) as run:
            statuses = [
                httpx.post(
                    f"{run.base}/jobs", json={"n": n}, headers={"X-Request-Id": f"r{n}"}
                ).status_code
                for n in range(EVENTS)
            ]
            for sig in stop:
                run.proc.send_signal(sig)
            returncode = run.proc.wait(timeout=15)
        return statuses, returncode, run.log.read_text(errors="replace")

    statuses, returncode, output = await asyncio.to_thread(serve_then_stop)
    assert statuses == [201] * EVENTS
    assert "terminate called" not in output, output[-3000:]
    assert returncode in codes, output[-3000:]
    assert "they are lost" not in output, output[-3000:]
    store = ValkeyStore(valkey_url, prefix=prefix)
    try:
        entries = await store.client.xrange(Outbox(store).key)
    finally:
        await store.stop()
    events = [json.loads(json.loads(fields[b"event"])["payload"]) for _, fields in entries]
    assert sorted(e["request_id"] for e in events) == [f"r{n}" for n in range(EVENTS)]


def _outbox(valkey_url: str, prefix: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The outbox stream's entries, read with a blocking client."""
    reader: Any = valkey.Valkey.from_url(valkey_url)
    try:
        return list(reader.xrange(Outbox(ValkeyStore(valkey_url, prefix=prefix)).key))
    finally:
        reader.close()


def _until(done: Callable[[], bool], log: Path, wait: float = 10.0) -> None:
    """Poll `done` until it holds; fail with the served process's log after `wait` s."""
    deadline = time.monotonic() + wait
    while not done():
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.02)


def test_a_forced_quit_saves_the_events_still_in_flight_to_the_outbox(
    tmp_path: Path, valkey_url: str, pulsar_url: str
) -> None:
    # The broker takes connections and never answers, so every event is still in flight
    # (its producer being made, for up to the 30 s send timeout) when two Ctrl+Cs come at
    # once. uvicorn then quits without the app's shutdown: the lifespan that would move
    # them to the outbox never runs. They are written there as the process exits.
    slow = (
        "@app.get('/slow')\nasync def slow() -> None:\n"
        "    open('slow-started', 'w').close()\n    await asyncio.sleep(30)\n\n\n"
    )
    served = SERVED_APP.replace("policyroute.install(app)", slow + "policyroute.install(app)")
    (tmp_path / "served_jobs.py").write_text("import asyncio\n" + served)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "routes.yaml").write_text(
        "version: 1\nroutes:\n  GET /ping:\n    public: true\n  GET /slow:\n    public: true\n"
        "  POST /jobs:\n    public: true\n"
        f"    events: {{topic: '{topic('silent')}', fields: {{request: [n]}}}}\n"
    )
    prefix = "t" + uuid.uuid4().hex[:10]
    env = {"POLICYROUTE_KEY_PREFIX": prefix, "POLICYROUTE_EVENTS_SEND_TIMEOUT": "30"}
    host, port = pulsar_url.removeprefix("pulsar://").rsplit(":", 1)
    with FaultProxy(host, int(port)) as broker:
        broker.blackhole()
        with (
            policyroute_run(
                tmp_path,
                "served_jobs:app",
                policies,
                valkey_url,
                broker.url("pulsar"),
                env,
                "/ping",
            ) as run,
            httpx.Client(base_url=run.base) as client,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            statuses = [
                client.post("/jobs", json={"n": n}, headers={"X-Request-Id": f"q{n}"}).status_code
                for n in range(EVENTS)
            ]
            pool.submit(httpx.get, f"{run.base}/slow", timeout=40)  # a response in progress
            _until(lambda: (tmp_path / "slow-started").exists(), run.log)
            # The first Ctrl+C: uvicorn waits for that response ...
            run.proc.send_signal(signal.SIGINT)
            _until(lambda: "Waiting for connections to close" in run.log.read_text(), run.log)
            # ... and the second one makes it quit at once, without the app's shutdown.
            run.proc.send_signal(signal.SIGINT)
            returncode = run.proc.wait(timeout=15)
        output = run.log.read_text(errors="replace")
    assert statuses == [201] * EVENTS
    assert "terminate called" not in output, output[-3000:]
    assert returncode in (0, 128 + signal.SIGINT, -signal.SIGINT), output[-3000:]
    assert "Waiting for application shutdown" not in output, output[-3000:]
    assert "lost" not in output, output[-3000:]
    entries = _outbox(valkey_url, prefix)
    events = [json.loads(json.loads(fields[b"event"])["payload"]) for _, fields in entries]
    assert sorted(e["request_id"] for e in events) == [f"q{n}" for n in range(EVENTS)]


NEVER_STOPPED = """
import asyncio, os
from policyroute.backends.valkey import ValkeyStore
from policyroute.events.bus import EventBus
from policyroute.events.envelope import Event, new_event_id

async def main() -> None:
    store = ValkeyStore(os.environ["VALKEY"], prefix=os.environ["PREFIX"])
    bus = EventBus(os.environ["URL"], store=store)
    await bus.start()
    for n in range(5):
        payload = ('{"id": "%s", "n": %d}' % (new_event_id(), n)).encode()
        bus.emit(Event(new_event_id(), "POST /x", os.environ["T"], payload))
    await asyncio.sleep(0.3)  # every event is in flight toward a broker that never answers
    # ... and the process ends without `bus.stop()`

if os.environ["ENDING"] == "asyncio.run":
    asyncio.run(main())
else:  # a loop closed as is: no task cancelled, no async generator closed
    loop = asyncio.new_event_loop()
    loop.run_until_complete(main())
    loop.close()
"""


@pytest.mark.parametrize(
    ("ending", "valkey_up", "said"),
    [
        ("asyncio.run", True, "was not stopped before its event loop ended"),
        ("asyncio.run", False, "5 event(s) could not be published or saved to the outbox"),
        ("loop.close", True, "saved 5 event(s) to the outbox at exit"),
        ("loop.close", False, "5 event(s) could not be saved to the outbox at exit"),
    ],
    ids=["run-valkey-up", "run-valkey-down", "closed-valkey-up", "closed-valkey-down"],
)
async def test_a_process_that_exits_without_stopping_its_bus_keeps_its_events(
    tmp_path: Path, valkey_url: str, pulsar_url: str, ending: str, valkey_up: bool, said: str
) -> None:
    # A bus nobody stops: the loop's end stops it (asyncio.run closes async generators),
    # or, with the loop closed as is, the interpreter's exit saves what it holds.
    path = tmp_path / "never_stopped.py"
    path.write_text(NEVER_STOPPED)
    prefix = "t" + uuid.uuid4().hex[:10]
    host, port = pulsar_url.removeprefix("pulsar://").rsplit(":", 1)
    with FaultProxy(host, int(port)) as broker:
        broker.blackhole()
        env = {
            **os.environ,
            "URL": broker.url("pulsar"),
            "VALKEY": valkey_url if valkey_up else "redis://127.0.0.1:1/0",
            "PREFIX": prefix,
            "T": topic("exit-save"),
            "ENDING": ending,
            "POLICYROUTE_EVENTS_FLUSH_TIMEOUT": "1",
            "POLICYROUTE_EVENTS_SEND_TIMEOUT": "30",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(path), env=env, stderr=asyncio.subprocess.PIPE
        )
        _, raw = await asyncio.wait_for(proc.communicate(), 30.0)
    err = raw.decode(errors="replace")
    assert "terminate called" not in err, err[-3000:]
    assert proc.returncode == 0, err[-3000:]
    entries = _outbox(valkey_url, prefix)
    assert said in err, err[-3000:]
    if valkey_up:
        payloads = [json.loads(json.loads(fields[b"event"])["payload"]) for _, fields in entries]
        assert sorted(p["n"] for p in payloads) == list(range(5))
    else:  # nowhere to keep them: said plainly, and the exit is still bounded and clean
        assert entries == []


@pytest.mark.parametrize("ending", ["asyncio.run", "loop.close"])
async def test_a_paused_valkey_at_exit_bounds_the_exit_and_says_what_is_lost(
    tmp_path: Path, valkey_url: str, pulsar_url: str, ending: str
) -> None:
    # Valkey stopped (SIGSTOP, as its clients see it: connections open, nothing answered)
    # while a process that never stopped its bus ends: the save waits its flush timeout,
    # says what was lost, and the process still exits cleanly.
    path = tmp_path / "never_stopped.py"
    path.write_text(NEVER_STOPPED)
    host, port = pulsar_url.removeprefix("pulsar://").rsplit(":", 1)
    v_host, v_port = valkey_url.removeprefix("redis://").split("/")[0].rsplit(":", 1)
    with FaultProxy(host, int(port)) as broker, FaultProxy(v_host, int(v_port)) as store:
        broker.blackhole()
        store.pause()
        env = {
            **os.environ,
            "URL": broker.url("pulsar"),
            "VALKEY": store.url("redis", "/0"),
            "PREFIX": "t" + uuid.uuid4().hex[:10],
            "T": topic("exit-paused"),
            "ENDING": ending,
            "POLICYROUTE_EVENTS_SEND_TIMEOUT": "30",
            "POLICYROUTE_EVENTS_FLUSH_TIMEOUT": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(path), env=env, stderr=asyncio.subprocess.PIPE
        )
        _, raw = await asyncio.wait_for(proc.communicate(), 30.0)
        took = time.monotonic() - started
        store.heal()
    err = raw.decode(errors="replace")
    assert "terminate called" not in err, err[-3000:]
    assert proc.returncode == 0, err[-3000:]
    assert "5 event(s) could not be" in err and "they are lost" in err, err[-3000:]
    assert took < 15, took
