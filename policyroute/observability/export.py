"""A span exporter wrapper that scrubs secrets from every span before it leaves the process.

policyroute's own spans carry decisions only (never tokens, codes, keys or user data).
Other instrumentation is less careful: a framework's server span may record `url.query`
as sent, so a bearer token a client put in the query string (which policyroute refuses)
would be exported with it. Wrap the exporter to scrub every span the way logs are:

```python
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from policyroute.observability.export import SanitizingExporter

provider.add_span_processor(BatchSpanProcessor(SanitizingExporter(OTLPSpanExporter())))
```

Needs the OpenTelemetry SDK (`pip install policyroute[otel]`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

try:
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "policyroute.observability.export needs the OpenTelemetry SDK: "
        "pip install 'policyroute[otel]'"
    ) from exc
from opentelemetry.trace import Status

from .logs import REDACTED, REDACTION, clean, scrub


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if REDACTION.sensitive(key.rsplit(".", 1)[-1]):
            out[key] = REDACTED
        elif isinstance(value, str):
            out[key] = scrub(value)
        elif isinstance(value, list | tuple):
            out[key] = tuple(scrub(v) if isinstance(v, str) else v for v in value)
        else:
            out[key] = value
    return out


def sanitized(span: ReadableSpan) -> ReadableSpan:
    """A copy of a finished span with credentials, JWTs and sensitive values redacted."""
    status = span.status
    if status.description:
        status = Status(status.status_code, scrub(status.description))
    events = [Event(scrub(e.name), _attributes(e.attributes), e.timestamp) for e in span.events]
    return ReadableSpan(
        name=scrub(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=_attributes(span.attributes),
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class SanitizingExporter(SpanExporter):
    """Scrubs every span, then hands it to the wrapped exporter."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export the scrubbed copies."""
        return self.inner.export([sanitized(s) for s in spans])

    def shutdown(self) -> None:
        """Shut the wrapped exporter down."""
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the wrapped exporter."""
        return self.inner.force_flush(timeout_millis)


__all__ = ["SanitizingExporter", "clean", "sanitized"]
