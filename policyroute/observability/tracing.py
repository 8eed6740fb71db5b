"""OpenTelemetry spans: the API always, the SDK only when the application configures one.

`active()` is the one check on the request path: with no SDK tracer provider it returns
None and the chain runs without building a single span or attribute. With one it returns
policyroute's tracer; a request whose span is not sampled still runs the untraced path
(inside the non-recording span, so its context still propagates).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, Final

from opentelemetry import propagate, trace
from opentelemetry.trace import (
    NoOpTracerProvider,
    ProxyTracerProvider,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    TracerProvider,
)

from .._version import __version__

NAME: Final = "policyroute"
PREFIX: Final = "policyroute."

class _Choice:
    """Which provider `active` last saw and the tracer it chose; one object, so the
    compiled `active` reads attributes instead of module globals."""

    __slots__ = ("explicit", "seen", "tracer")

    def __init__(self) -> None:
        self.explicit: TracerProvider | None = None
        self.seen: object = object()
        self.tracer: Tracer | None = None


_CHOICE: Final = _Choice()


def set_provider(provider: TracerProvider | None) -> None:
    """Give policyroute its own tracer provider (None: follow the global one again)."""
    _CHOICE.explicit = provider
    _CHOICE.seen = object()
    _CHOICE.tracer = None


_MISSING: Final = object()
trace.get_tracer_provider()  # a provider named by OTEL_PYTHON_TRACER_PROVIDER loads now


def active() -> Tracer | None:
    """policyroute's tracer when an SDK provider is configured; None when tracing is off."""
    choice = _CHOICE
    provider: object = choice.explicit
    if provider is None:
        # `trace.get_tracer_provider()` reads os.environ on every call while no provider
        # is set (about a microsecond); the module global it consults is read directly.
        provider = getattr(trace, "_TRACER_PROVIDER", _MISSING)
        if provider is _MISSING:
            provider = trace.get_tracer_provider()
    if provider is choice.seen:
        return choice.tracer
    choice.seen = provider
    if provider is None or isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
        choice.tracer = None
    else:
        assert isinstance(provider, TracerProvider)
        choice.tracer = provider.get_tracer(NAME, __version__)
    return choice.tracer


def error_type(exc: BaseException) -> str:
    """The exception's class name: spans name the kind of failure, never its message."""
    cls = type(exc)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def fail(span: Any, exc: BaseException) -> None:
    """Mark a span failed by an exception without recording its message or traceback."""
    name = error_type(exc)
    span.set_attribute("error.type", name)
    span.set_status(Status(StatusCode.ERROR, name))


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current trace context (traceparent, tracestate, baggage) into `carrier`."""
    propagate.inject(carrier)


def extract(carrier: Mapping[str, str]) -> Any:
    """The trace context carried by `carrier` (e.g. request headers, message properties)."""
    return propagate.extract(carrier)


@contextlib.contextmanager
def consumer_span(topic: str, subscription: str, properties: Mapping[str, str]) -> Iterator[None]:
    """A CONSUMER span around one message's handler, child of the producer's trace context."""
    tracer = active()
    if tracer is None:
        yield
        return
    attributes = {
        "messaging.system": "pulsar",
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        "messaging.consumer.group.name": subscription,
    }
    with tracer.start_as_current_span(
        f"process {topic}",
        context=extract(properties),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        event_id = properties.get("event_id")
        if event_id:
            span.set_attribute("messaging.message.id", event_id)
        try:
            yield
        except BaseException as exc:
            fail(span, exc)
            raise
