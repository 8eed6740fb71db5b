"""Pulsar client helpers: one logger, one way to tell a broker outage from a bad event."""

from __future__ import annotations

import gc
import logging
from typing import Any

# The C++ client logs through this logger (connection retries during an outage are noisy;
# tune it apart from "policyroute").
CLIENT_LOG = logging.getLogger("policyroute.pulsar")

# Results that say the broker (or the path to it) is away or busy: the event itself is fine,
# so the failure never counts toward `max_attempts` and the event waits in the outbox.
TRANSIENT = frozenset(
    {
        "AlreadyClosed",
        "BrokerMetadataError",
        "BrokerPersistenceError",
        "ConnectError",
        "Interrupted",
        "LookupError",
        "MemoryBufferIsFull",
        "NotConnected",
        "ProducerBlockedQuotaExceededError",
        "ProducerBlockedQuotaExceededException",
        "ProducerNotInitialized",
        "ProducerQueueIsFull",
        "ReadError",
        "ServiceUnitNotReady",
        "Timeout",
        "TooManyLookupRequestException",
    }
)


class BrokerUnavailable(Exception):  # noqa: N818 - a state, raised to route an event to the outbox
    """The broker cannot take events right now (not connected, or a recent attempt failed)."""


def result_name(exc: BaseException) -> str:
    """The Pulsar result name of an exception (`Timeout`, `MessageTooBig`...), else its type."""
    error = getattr(exc, "error", None)
    if callable(error):
        try:
            return str(error().name)
        except Exception:  # any failure here only loses the detail
            return type(exc).__name__
    return type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    """True when a failure says nothing about the event itself (broker away, queue full)."""
    if isinstance(exc, BrokerUnavailable | TimeoutError | OSError):
        return True
    return result_name(exc) in TRANSIENT


def release_clients() -> None:
    """Destroy closed native clients now, while the interpreter can still take their calls.

    A closed client held in a reference cycle is otherwise destroyed at interpreter exit,
    where its C++ threads' last calls into Python (a log line, a callback) abort the
    process ("terminate called without an active exception", exit -6, about one exit in
    ten). Collecting after the close destroys it, its threads joined, before exit.
    """
    gc.collect()


def async_client(url: str, *, operation_timeout: float) -> Any:
    """A `pulsar.asyncio.Client` that logs through `policyroute.pulsar` (connects lazily)."""
    import pulsar.asyncio

    return pulsar.asyncio.Client(
        url,
        operation_timeout_seconds=max(1, round(operation_timeout)),
        connection_timeout_ms=max(100, int(operation_timeout * 1000)),
        logger=CLIENT_LOG,
    )
