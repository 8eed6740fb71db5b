"""The session's real servers: Valkey answers commands, the broker carries messages."""

from __future__ import annotations

import contextlib
import ipaddress
import uuid
from pathlib import Path

import httpx
import pulsar
import valkey


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

    from policyroute.embedded import start_pulsar, start_valkey

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
