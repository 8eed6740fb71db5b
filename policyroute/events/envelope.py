"""The event a route publishes after a 2xx: one JSON envelope with a stable id."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# Property names carried on every Pulsar message (values are strings).
EVENT_ID = "event_id"


def new_event_id() -> str:
    """A fresh event id (uuid4, hex); generated once per request, kept through outbox and DLQ."""
    return uuid.uuid4().hex


def rfc3339_now() -> str:
    """The current UTC time as RFC 3339 with milliseconds, e.g. 2025-01-31T12:00:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_MISSING = object()


def _lookup(doc: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path into nested objects; `_MISSING` when absent.

    A path resolves one way only: `order.amount` is the `amount` key of the `order`
    object, never a top-level key spelled "order.amount" (a body could otherwise send
    both and make the event disagree with what the handler read). A key whose name holds
    a dot cannot be chosen; arrays are not entered.
    """
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


# A chosen field's value nested deeper than this stays out of an event: the envelope is
# encoded after the response, where a RecursionError would fail the request.
MAX_FIELD_DEPTH = 100


class TooDeep(ValueError):  # noqa: N818 - a kind of invalid document, like JSONDecodeError
    """A JSON document nested deeper than the parser can go."""


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether a JSON value nests arrays or objects more than `limit` levels (no recursion)."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in node)
    return False


def pick(doc: Any, paths: Sequence[str]) -> dict[str, Any]:
    """The chosen fields of a JSON object, keyed by their path; absent fields are omitted,
    and so are values nested deeper than MAX_FIELD_DEPTH."""
    if not paths or not isinstance(doc, Mapping):
        return {}
    out: dict[str, Any] = {}
    for path in paths:
        value = _lookup(doc, path)
        if value is _MISSING:
            continue
        if isinstance(value, dict | list) and nests_deeper(value, MAX_FIELD_DEPTH):
            continue
        out[path] = value
    return out


def parse_json(body: bytes) -> Any:
    """The JSON document of a body, or None when it is not JSON.

    Raises TooDeep when it nests deeper than the parser can go (a RecursionError).
    """
    if not body:
        return None
    try:
        return json.loads(body)
    except RecursionError:
        raise TooDeep("the JSON document is nested too deeply to read") from None
    except (UnicodeDecodeError, ValueError):
        return None


@dataclass(slots=True)
class Event:
    """One event on its way to Pulsar: the envelope bytes plus where and how to deliver it."""

    id: str
    route: str
    topic: str
    payload: bytes
    dlq: str | None = None
    max_attempts: int = 5
    sensitive: bool = False
    properties: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    error: str = ""

    def message_properties(self) -> dict[str, str]:
        """The Pulsar message properties: the hook's own plus `event_id`."""
        return {**self.properties, EVENT_ID: self.id}


def envelope(
    *,
    event_id: str,
    route: str,
    subject: str | None,
    request_id: str,
    status: int,
    request: Mapping[str, Any],
    response: Mapping[str, Any],
    time: str | None = None,
) -> bytes:
    """The JSON envelope of an event (compact, UTF-8)."""
    doc = {
        "id": event_id,
        "route": route,
        "subject": subject,
        "request_id": request_id,
        "time": time or rfc3339_now(),
        "status": status,
        "request": dict(request),
        "response": dict(response),
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()
