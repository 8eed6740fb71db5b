"""Route events on Pulsar: the publishing service, its Valkey outbox, and consumers."""

from __future__ import annotations

from .consumer import Consumer, Message, MessageHandler, Worker, consumer, consumers
from .envelope import EVENT_ID, Event, envelope

__all__ = [
    "EVENT_ID",
    "Consumer",
    "Event",
    "Message",
    "MessageHandler",
    "Worker",
    "consumer",
    "consumers",
    "envelope",
]
