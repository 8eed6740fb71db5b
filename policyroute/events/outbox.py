"""The events outbox: a Valkey stream that holds events the broker could not take yet.

Entries are read by relays through one consumer group, so several workers share the
work; an entry a crashed worker left pending is claimed by another after `claim_idle`.
For a `sensitive` route the stored event is sealed with the keyring (AES-256-GCM, the
stream key as associated data); only routing metadata (route template, topics, attempt
count, error name) stays readable.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..backends.valkey import Arg, Store
from ..crypto import DataKeyError, Keyring
from .envelope import Event

GROUP = "policyroute-relay"
ADD = "events outbox write"


class OutboxError(Exception):
    """An outbox entry cannot be turned back into an event (bad format or unknown key)."""


@dataclass(slots=True)
class Entry:
    """One outbox stream entry as read back."""

    id: str
    fields: dict[str, bytes]

    def text(self, name: str, default: str = "") -> str:
        """A field as text."""
        raw = self.fields.get(name)
        return raw.decode("utf-8", "replace") if raw is not None else default

    def number(self, name: str, default: int) -> int:
        """A field as an integer."""
        try:
            return int(self.text(name))
        except ValueError:
            return default


def _consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class Outbox:
    """Outbox stream operations, each one Lua script (one round trip, one hash tag)."""

    def __init__(self, store: Store, keyring: Keyring | None = None) -> None:
        self.store = store
        self.keyring = keyring
        self.key = store.key("outbox", "events")
        self.parked_key = store.key("outbox", "parked")
        self.consumer = _consumer_name()
        self._aad = self.key.encode()

    def encode(self, event: Event) -> list[Arg]:
        """The script arguments of one event; a sensitive event's record is sealed."""
        record = json.dumps(
            {"payload": event.payload.decode(), "properties": event.properties},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        sealed = "0"
        if event.sensitive:
            if self.keyring is None:
                raise OutboxError(
                    f"{event.route}: a sensitive event is never stored in plain text; "
                    "set POLICYROUTE_DATA_KEYS"
                )
            record = self.keyring.seal(record, self._aad)
            sealed = "1"
        return [
            event.route,
            event.topic,
            event.dlq or "",
            event.max_attempts,
            event.attempts,
            event.error,
            sealed,
            record,
        ]

    def decode(self, entry: Entry) -> Event:
        """The event an entry holds; raise OutboxError when it cannot be read."""
        record = entry.fields.get("event", b"")
        sensitive = entry.text("sealed") == "1"
        if sensitive:
            if self.keyring is None:
                raise OutboxError("sealed outbox entry but no POLICYROUTE_DATA_KEYS are set")
            try:
                record = self.keyring.open(record, self._aad)
            except DataKeyError as exc:
                raise OutboxError(f"sealed outbox entry does not open: {exc}") from exc
        try:
            doc = json.loads(record)
            payload = str(doc["payload"]).encode()
            properties = {str(k): str(v) for k, v in dict(doc.get("properties") or {}).items()}
            event_id = str(json.loads(payload)["id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise OutboxError(f"outbox entry is not an event record: {exc}") from exc
        return Event(
            id=event_id,
            route=entry.text("route"),
            topic=entry.text("topic"),
            payload=payload,
            dlq=entry.text("dlq") or None,
            max_attempts=entry.number("max_attempts", 5),
            sensitive=sensitive,
            properties=properties,
            attempts=entry.number("attempts", 0),
            error=entry.text("error"),
        )

    async def add(self, events: Sequence[Event]) -> int:
        """Append events; return the stream length."""
        reply = await self.store.run(
            "outbox_add", [self.key], self._added(events), operation=ADD, fail_open=False
        )
        return int(reply)

    def add_now(self, events: Sequence[Event], *, timeout: float) -> int:
        """`add` as one blocking call, for a process exiting without its event loop."""
        return int(self.store.run_now("outbox_add", [self.key], self._added(events), ADD, timeout))

    def _added(self, events: Sequence[Event]) -> list[Arg]:
        args: list[Arg] = []
        for event in events:
            args.extend(self.encode(event))
        return args

    async def read(self, count: int, claim_idle: float) -> tuple[int, list[Entry]]:
        """(stream length, next entries for this relay): own pending, then claimed, then new."""
        reply = await self.store.run(
            "outbox_read",
            [self.key],
            [GROUP, self.consumer, count, int(claim_idle * 1000)],
            operation="events outbox read",
            fail_open=False,
        )
        depth, raw = reply
        entries = []
        for item in raw:
            flat = list(item[1] or [])
            fields = {_text(flat[i]): _raw(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
            entries.append(Entry(_text(item[0]), fields))
        return int(depth), entries

    async def done(self, ids: Sequence[str]) -> int:
        """Acknowledge and delete relayed entries; return the stream length."""
        reply = await self.store.run(
            "outbox_done", [self.key], [GROUP, *ids], operation="events outbox ack", fail_open=False
        )
        return int(reply)

    async def move(self, moves: Sequence[tuple[str, int, str]], *, park: bool = False) -> int:
        """Re-queue entries (id, attempts, error) at the end, or park them; return the length."""
        args: list[Arg] = [GROUP]
        for entry_id, attempts, error in moves:
            args.extend((entry_id, attempts, error))
        target = self.parked_key if park else self.key
        reply = await self.store.run(
            "outbox_move",
            [self.key, target],
            args,
            operation="events outbox requeue",
            fail_open=False,
        )
        return int(reply)
