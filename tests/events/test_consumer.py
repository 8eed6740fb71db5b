"""Consumers: handlers ack or nack, poison messages reach the DLQ, `policyroute worker` runs them."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
from pathlib import Path

import pulsar
import pulsar.asyncio
import pytest

import policyroute
from policyroute.events._pulsar import native_logger
from policyroute.events.consumer import Message, Worker
from tests.servers import REPO

from .kit import QUIET, Listener, topic


async def _publish(url: str, topic_name: str, *payloads: bytes) -> None:
    client = pulsar.asyncio.Client(url, logger=QUIET)
    try:
        producer = await client.create_producer(topic_name)
        for payload in payloads:
            await producer.send(payload, properties={"event_id": payload.decode()})
        await producer.close()
    finally:
        await client.close()


async def test_a_poison_message_reaches_the_dlq_after_max_redeliveries(pulsar_url: str) -> None:
    t, dlq = topic("orders"), topic("orders-dlq")
    seen: list[tuple[bytes, int]] = []
    handled = asyncio.Event()
    worker = Worker()

    @worker.consumer(
        t,
        subscription="billing",
        dlq=dlq,
        max_redeliveries=2,
        retry_delay="100ms",
        initial_position="earliest",
    )
    async def bill(message: Message) -> None:
        seen.append((message.data, message.redelivery_count))
        if message.data == b"poison":
            raise ValueError("cannot bill this")
        assert message.event_id == "good"
        handled.set()

    async with Listener(pulsar_url, dlq) as dead:
        await worker.start(pulsar_url)
        try:
            await _publish(pulsar_url, t, b"poison", b"good")
            [message] = await dead.take(1, wait=10.0)
            await asyncio.wait_for(handled.wait(), 5.0)
            assert await dead.take(1, wait=0.5) == []  # only the poison message
        finally:
            await worker.stop()
    assert message.data() == b"poison"
    assert message.properties()["event_id"] == "poison"
    # one delivery and two redeliveries, each after a negative acknowledgement
    assert [count for data, count in seen if data == b"poison"] == [0, 1, 2]
    assert [data for data, _ in seen].count(b"good") == 1  # acknowledged once, not redelivered


async def test_without_a_dlq_topic_dead_letters_go_to_pulsars_default_topic(
    pulsar_url: str,
) -> None:
    t = topic("refunds")
    worker = Worker()

    @worker.consumer(
        t, subscription="s", max_redeliveries=1, retry_delay="100ms", initial_position="earliest"
    )
    async def refund(message: Message) -> None:
        raise ValueError("never")

    async with Listener(pulsar_url, f"{t}-s-DLQ") as dead:
        await worker.start(pulsar_url)
        try:
            await _publish(pulsar_url, t, b"poison")
            [message] = await dead.take(1, wait=10.0)
        finally:
            await worker.stop()
    assert message.data() == b"poison"
    assert message.properties()["event_id"] == "poison"
    assert message.properties()["REAL_TOPIC"] == t


def test_a_worker_remembers_a_bounded_number_of_batched_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys.modules[Worker.__module__], "SETTLED_MAX", 10)
    worker = Worker()
    for entry in range(6):
        for index in range(4):
            worker._settle(("s@t", -1, 1, entry), index)
    # the oldest batches go first, whole
    assert list(worker._settled) == [("s@t", -1, 1, 4), ("s@t", -1, 1, 5)]
    assert worker._settled_count == 8
    worker._settle(None, -1)  # an unbatched message: nothing to remember
    assert worker._settled_count == 8


def test_consumer_settings_are_checked_when_registered() -> None:
    worker = Worker()
    with pytest.raises(ValueError, match="invalid Pulsar topic"):
        worker.consumer("orders", subscription="s")
    with pytest.raises(ValueError, match="max_redeliveries"):
        worker.consumer(topic("x"), subscription="s", max_redeliveries=0)
    with pytest.raises(ValueError, match="invalid duration"):
        worker.consumer(topic("x"), subscription="s", retry_delay="soon")

    def blocking(message: Message) -> None:
        return None

    with pytest.raises(TypeError, match="async def"):
        worker.consumer(topic("x"), subscription="s")(blocking)  # type: ignore[type-var]
    assert worker.consumers == []


WORKER_MODULE = """\
import os

import policyroute


@policyroute.consumer(os.environ["WORKER_TOPIC"], subscription="w", initial_position="earliest")
async def record(message: policyroute.Message) -> None:
    print("handled", message.data.decode(), message.event_id, flush=True)
"""


WORKER_START_STOP = """
import asyncio, os, policyroute

async def main() -> None:
    worker = policyroute.Worker()

    @worker.consumer(os.environ["T"], subscription="s")
    async def handle(message: policyroute.Message) -> None:
        pass

    await worker.start(os.environ["URL"])
    await asyncio.sleep(0.05)
    await worker.stop(1.0)

asyncio.run(main())
"""

BUS_START_STOP = """
import asyncio, os
from policyroute.events.bus import EventBus
from policyroute.events.envelope import Event, new_event_id

async def main() -> None:
    bus = EventBus(os.environ["URL"], store=None)
    await bus.start()
    bus.emit(Event(new_event_id(), "POST /x", os.environ["T"], b"{}"))
    await bus.stop()  # publishes what is pending first
    assert bus.dropped == 0

asyncio.run(main())
"""

# Nothing runs between the close and the interpreter's exit: the narrowest window for a
# native thread that still has to call into Python (a bare `await client.close()` of
# pulsar.asyncio in this script's place aborted 16 exits in 20).
CLIENT_CLOSE = """
import asyncio, os
from policyroute.events._pulsar import async_client, close_client

async def main() -> None:
    await close_client(async_client(os.environ["URL"], operation_timeout=5.0), 5.0)

asyncio.run(main())
"""


@pytest.mark.parametrize(
    "script", [WORKER_START_STOP, BUS_START_STOP, CLIENT_CLOSE], ids=["worker", "bus", "client"]
)
async def test_a_process_that_stopped_its_pulsar_client_exits_cleanly_every_time(
    pulsar_url: str, tmp_path: Path, script: str
) -> None:
    # A closed native client left to interpreter exit aborted about one exit in ten
    # (exit -6, "terminate called without an active exception"): 16 exits, 4 at a time.
    path = tmp_path / "start_and_stop.py"
    path.write_text(script)
    slots = asyncio.Semaphore(4)
    # This checkout's policyroute, whatever the environment has installed.
    path_entries = [str(REPO), os.environ.get("PYTHONPATH")]

    async def once(n: int) -> tuple[int, bytes]:
        async with slots:
            env = {
                **os.environ,
                "URL": pulsar_url,
                "T": topic(f"exit{n}"),
                "PYTHONPATH": os.pathsep.join(filter(None, path_entries)),
            }
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(path), env=env, stderr=asyncio.subprocess.PIPE
            )
            _, err = await asyncio.wait_for(proc.communicate(), 30.0)
            return proc.returncode or 0, err

    results = await asyncio.gather(*(once(n) for n in range(16)))
    failed = [(code, err.decode(errors="replace")[-300:]) for code, err in results if code]
    assert failed == []


async def test_policyroute_worker_runs_a_consumer_module_until_sigterm(
    pulsar_url: str, tmp_path: Path
) -> None:
    t = topic("worker")
    (tmp_path / "my_consumers.py").write_text(textwrap.dedent(WORKER_MODULE))
    env = {**os.environ, "POLICYROUTE_PULSAR_URL": pulsar_url, "WORKER_TOPIC": t}
    cli = Path(sys.executable).parent / "policyroute"
    proc = await asyncio.create_subprocess_exec(
        str(cli),
        "worker",
        "my_consumers",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), 20.0)
        assert b"worker consuming w@" + t.encode() in line
        await _publish(pulsar_url, t, b"hello")
        handled = await asyncio.wait_for(proc.stdout.readline(), 10.0)
        assert handled == b"handled hello hello\n"
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 15.0)
        assert await proc.wait() == 0, rest.decode(errors="replace")[-3000:]
        assert b"worker stopped" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_worker_without_consumers_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty_consumers.py").write_text(
        "import policyroute\nworker = policyroute.Worker()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from policyroute.cli import main

    assert main(["worker", "empty_consumers:worker"]) == 2
    assert "no consumers" in capsys.readouterr().err
    assert main(["worker", "empty_consumers:missing"]) == 2
    assert isinstance(policyroute.consumers, Worker)


@pytest.mark.parametrize(
    ("level", "native"),
    [
        (logging.DEBUG, pulsar.LoggerLevel.Debug),
        (logging.INFO, pulsar.LoggerLevel.Info),
        (logging.WARNING, pulsar.LoggerLevel.Warn),
        (logging.ERROR, pulsar.LoggerLevel.Error),
    ],
)
def test_the_native_client_logs_to_stderr_at_the_level_of_its_logger(
    level: int, native: object
) -> None:
    logger = logging.getLogger("policyroute.pulsar")
    before = logger.level
    logger.setLevel(level)
    try:
        made = native_logger()
    finally:
        logger.setLevel(before)
    assert isinstance(made, pulsar.FileLogger)
    assert made.log_level == native and made.log_file == "/dev/stderr"
