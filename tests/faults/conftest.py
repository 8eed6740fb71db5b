"""The fault suite: every test here carries the `faults` marker (`pytest -m faults`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from policyroute.backends.embedded import EmbeddedValkey, start_valkey

from .kit import thaw
from .proxy import FaultProxy

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: fault injection against real servers (tests/faults/)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedValkey]:
    """A valkey-server of the test module alone: its tests pause and kill it."""
    own = start_valkey()
    try:
        yield own
    finally:
        thaw(own.pid)
        own.stop()


@pytest.fixture(scope="module")
def proxy(server: EmbeddedValkey) -> Iterator[FaultProxy]:
    """The link to the module's server, whose faults the tests control."""
    with FaultProxy("127.0.0.1", server.port) as link:
        yield link
