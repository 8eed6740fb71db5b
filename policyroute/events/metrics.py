"""Prometheus metrics of events and consumers (labels: route template, outcome; never user data)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

EVENTS = Counter(
    "policyroute_events",
    "Route events by outcome: published, outbox (saved for the relay), dlq, failed (lost).",
    ["route", "outcome"],
)
OUTBOX_DEPTH = Gauge(
    "policyroute_outbox_depth", "Entries in the events outbox stream, as last seen by this process."
)
CONSUMED = Counter(
    "policyroute_consumer_messages",
    "Messages handled by consumers: ack (handled) or nack (handler failed, redelivered later).",
    ["subscription", "outcome"],
)
