"""Pulsar client helpers: one logger, one way to tell a broker outage from a bad event."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Any

# The level of the C++ client's own log lines (connection retries during an outage are
# noisy; tune it apart from "policyroute"): this logger's effective level when a client is
# made. The lines go to stderr from the client's threads, not through Python logging: a
# native thread that calls into Python while the interpreter exits aborts the process
# ("terminate called without an active exception", exit -6), and the client's threads
# log as they wind down, about one exit in ten.
CLIENT_LOG = logging.getLogger("policyroute.pulsar")
STDERR = "/dev/stderr"

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


async def close_client(client: Any, wait: float) -> None:
    """Close a `pulsar.asyncio.Client` so that no native thread calls into Python afterwards.

    `pulsar.asyncio.Client.close` gives the C++ client a Python callback. The client ends
    its close on a native thread of its own, which calls that callback (waking the event
    loop) and then drops it, taking the GIL a second time. A process that exits right after
    the close may be finalizing by then; a native thread that takes the GIL during
    finalization is ended inside a destructor and the process aborts ("terminate called
    without an active exception", SIGABRT: exit -6, 134 from a shell).

    The native client's blocking `close` waits for the same end through a C++ promise, with
    no Python object for that thread to drop. It runs in a worker thread, which the
    interpreter joins before it finalizes even when `wait` seconds pass first.
    """
    native = getattr(client, "_client", None)  # the `_pulsar.Client` the wrapper drives
    blocking = getattr(native, "close", None)
    if not callable(blocking):  # another wrapper: its own close, and the race it has
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), wait)
        return
    closing = asyncio.ensure_future(asyncio.to_thread(blocking))
    # Retrieved either way (e.g. AlreadyClosed), also when the wait below gives up first.
    closing.add_done_callback(lambda done: done.cancelled() or done.exception())
    await asyncio.wait({closing}, timeout=wait)


def release_clients() -> None:
    """Destroy closed native clients now, while the interpreter can still take their calls.

    A closed client held in a reference cycle is otherwise destroyed at interpreter exit,
    where its C++ threads' last calls into Python abort the process ("terminate called
    without an active exception", exit -6). Worker exits that aborted (start, stop, exit):
    with logging through Python 6 in 60, stderr logging alone 3 in 80, both this and
    stderr logging 0 in 80 (and 0 in 176 more across 11 runs of tests/events).
    """
    gc.collect()


def native_logger() -> Any:
    """The C++ client's logger: stderr at the level of `policyroute.pulsar`."""
    import pulsar

    level = CLIENT_LOG.getEffectiveLevel()
    if level <= logging.DEBUG:
        native = pulsar.LoggerLevel.Debug
    elif level <= logging.INFO:
        native = pulsar.LoggerLevel.Info
    elif level <= logging.WARNING:
        native = pulsar.LoggerLevel.Warn
    else:
        native = pulsar.LoggerLevel.Error
    return pulsar.FileLogger(native, STDERR)


def async_client(url: str, *, operation_timeout: float) -> Any:
    """A `pulsar.asyncio.Client` logging to stderr at `policyroute.pulsar`'s level (lazy)."""
    import pulsar.asyncio

    return pulsar.asyncio.Client(
        url,
        operation_timeout_seconds=max(1, round(operation_timeout)),
        connection_timeout_ms=max(100, int(operation_timeout * 1000)),
        logger=native_logger(),
    )
