"""The session's real servers: Valkey answers commands, the broker carries messages."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pulsar
import pytest
import valkey

from tests.servers import REPO, free_port


def test_valkey_fixture_is_a_real_server(valkey_url: str) -> None:
    client = valkey.Valkey.from_url(valkey_url)
    try:
        assert client.ping()
        info: dict[str, object] = client.info("server")  # type: ignore[assignment]
        assert "valkey_version" in info
        assert client.eval("return redis.call('TIME')[1]", 0)
    finally:
        client.close()  # type: ignore[no-untyped-call]


def test_pulsar_fixture_carries_messages_with_the_official_client(pulsar_url: str) -> None:
    topic = f"persistent://public/default/embedded-{uuid.uuid4().hex}"
    client = pulsar.Client(pulsar_url)
    try:
        consumer = client.subscribe(topic, "test")
        producer = client.create_producer(topic)
        producer.send(b"hello", properties={"event_id": "e1"})
        message = consumer.receive(timeout_millis=5000)
        assert message.data() == b"hello"
        assert message.properties() == {"event_id": "e1"}
        consumer.acknowledge(message)
    finally:
        client.close()


def listening(pid: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """The TCP addresses and ports a process listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = str(fd.readlink())
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = local.split(":")
            raw = bytes.fromhex(hex_address)
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((ipaddress.ip_address(packed), int(hex_port, 16)))
    return found


def test_embedded_servers_listen_on_loopback_only(tmp_path: Path) -> None:
    """What `policyroute run` starts (Valkey, the broker and the broker's metrics endpoint)
    is reachable from this machine only."""
    from pulsar_lite.process_manager import process_manager

    from policyroute.backends.embedded import start_pulsar, start_valkey

    server = start_valkey()
    broker = start_pulsar(tmp_path / "broker")
    try:
        broker_pid = process_manager._processes[str(tmp_path / "broker" / "broker.db")][0].pid
        for pid in (server.pid, broker_pid):
            sockets = listening(pid)
            assert sockets, f"process {pid} listens on nothing"
            exposed = [f"{address}:{port}" for address, port in sockets if not address.is_loopback]
            assert exposed == [], f"process {pid} listens beyond loopback"
        ports = {port for _, port in listening(broker_pid)}
        broker_port = int(broker.url.rsplit(":", 1)[1])
        assert len(ports) == 2 and broker_port in ports  # the broker and its metrics
        assert broker.metrics_url == f"http://127.0.0.1:{(ports - {broker_port}).pop()}/metrics"
        metrics = httpx.get(broker.metrics_url, timeout=5.0)
        assert metrics.status_code == 200 and "# TYPE" in metrics.text
    finally:
        broker.stop()
        server.stop()


def test_embedded_servers_remove_their_temporary_folders_on_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from policyroute.backends.embedded import start_pulsar, start_valkey

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server, broker = start_valkey(), start_pulsar()
    assert len(list(tmp_path.iterdir())) == 2  # one folder each while they run
    server.stop()
    server.restart()  # as fault tests do: a new folder for the new server
    assert len(list(tmp_path.iterdir())) == 2
    broker.stop()
    server.stop()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_policyroute_run_removes_its_embedded_folders_on_exit(
    stop: signal.Signals, tmp_path: Path
) -> None:
    """`policyroute run` on embedded backends leaves no folder (and no server) behind,
    whether it is stopped with Ctrl-C or SIGTERM (a process manager, `docker stop`)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYROUTE_")}
    env.update(TMPDIR=str(temp), PYTHONPATH=str(REPO))
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "policyroute.cli", "run", "examples.app:app",
             "--port", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        during = sorted(p.name.split("-")[1] for p in temp.iterdir())
        assert during == ["pulsar", "valkey"], during
        valkey_port = int(log.read_text().split("embedded Valkey at redis://127.0.0.1:")[1][:5])
        proc.send_signal(stop)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(temp.iterdir()) == [], log.read_text()
    with socket.socket() as s:  # the embedded Valkey was stopped, not orphaned
        assert s.connect_ex(("127.0.0.1", valkey_port)) != 0
