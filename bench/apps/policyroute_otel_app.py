"""The bench app with the OpenTelemetry SDK on: every span recorded, scrubbed and exported.

``BENCH_OTEL=global`` (the default) sets the SDK as the global tracer provider, as an
application that traces would: FastAPI then makes its own server and operation spans
and policyroute makes its request and step spans beneath them. ``BENCH_OTEL=policyroute``
gives the provider to policyroute only (``tracing.set_provider``), so only policyroute's
spans are made: the cost of policyroute's tracing alone. Every span is sampled. Spans
go through a ``BatchSpanProcessor`` (and, for the global provider, ``SanitizingExporter``)
to an exporter that drops them (no collector on the bench machine), so span creation,
batching and scrubbing are measured, not a network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from bench.apps.policyroute_app import app, engine
from policyroute.observability import tracing
from policyroute.observability.export import SanitizingExporter


class Sink(SpanExporter):
    """Accepts every batch and keeps nothing."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Drop the batch."""
        return SpanExportResult.SUCCESS


provider = TracerProvider()
if os.environ.get("BENCH_OTEL", "global") == "policyroute":
    # policyroute's spans name decisions only: nothing to scrub.
    provider.add_span_processor(BatchSpanProcessor(Sink()))
    tracing.set_provider(provider)
else:
    # FastAPI's server span records url.query as sent: scrub before export.
    provider.add_span_processor(BatchSpanProcessor(SanitizingExporter(Sink())))
    trace.set_tracer_provider(provider)

__all__ = ["app", "engine"]
