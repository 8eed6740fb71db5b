"""Request ids: the caller's when it is sane, else one made here; echoed on the response."""

from __future__ import annotations

import contextvars
import re
from collections.abc import Awaitable, Sequence
from typing import Final

from starlette.types import Message, Send

from .._ids import IDS

# Printable, short, and no room for log injection (no spaces, quotes or control bytes).
_SANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}")
MAX_ID: Final = 128


def sane(value: str) -> bool:
    """Whether a caller's request id may be used as is (never one shaped like a JWT)."""
    if not _SANE.fullmatch(value):
        return False
    return not (value.startswith("eyJ") and value.count(".") >= 2)


class RequestIds:
    """Reads, makes and echoes the request id of every request through a chain."""

    __slots__ = ("header", "name")

    def __init__(self, header: str = "x-request-id") -> None:
        self.name = header.strip().lower()
        self.header = self.name.encode("latin-1")

    def accept(self, raw: bytes | None) -> str:
        """A caller's raw id when sane, else a new one (a long value is never decoded)."""
        if raw is None or len(raw) > MAX_ID:
            return IDS.next()
        text = raw.decode("latin-1")
        return text if sane(text) else IDS.next()

    def echo(self, send: Send, request_id: str, status: list[int]) -> Send:
        """A `send` that adds the request id header and notes the status in `status[0]`.

        It holds a list, not the request's context: the context holds this `send`, and a
        reference cycle per request would leave every request to the cyclic collector.
        """
        return _Echo(send, (self.header, request_id.encode("latin-1")), status)


class _Echo:
    """`RequestIds.echo`'s send: not a coroutine, it hands back the inner send's awaitable
    (no frame of its own per message)."""

    __slots__ = ("pair", "send", "status")

    def __init__(self, send: Send, pair: tuple[bytes, bytes], status: list[int]) -> None:
        self.send = send
        self.pair = pair
        self.status = status

    def __call__(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            self.status[0] = message["status"]
            start = dict(message)  # a copy: the app may send the same message again
            start["headers"] = [*start.get("headers", ()), self.pair]
            return self.send(start)
        return self.send(message)


class Current:
    """What log records need of the request being served: its id and its raw headers.

    Deliberately not the request's context: that holds the server's `send`, which leads
    back to the task whose context holds this value, and such a cycle per request would
    leave every request's objects to the cyclic garbage collector.
    """

    __slots__ = ("headers", "request_id", "secrets")

    def __init__(self, request_id: str, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.request_id = request_id
        self.headers = headers
        self.secrets: tuple[str, ...] | None = None


# The request being served (set and reset by the chain around every request).
CURRENT: Final[contextvars.ContextVar[Current | None]] = contextvars.ContextVar(
    "policyroute_request", default=None
)
