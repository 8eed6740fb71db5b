"""Suite-wide canaries: every test runs traced and logged, and no secret may surface.

`watch()` (a session fixture in tests/conftest.py) installs the OpenTelemetry SDK as the
global tracer provider with a span processor that scans every finished span of
policyroute as it was recorded, and an exporter (behind `SanitizingExporter`, as an
application would export) that scans every span of every instrumentation, FastAPI's
server spans included, as it would leave the process. It also adds a
handler on the root logger that formats every record as JSON (without sanitizing it: the
records must already be clean at their source) and scans it, lowers the `policyroute`
loggers to DEBUG, and at the end scans every label of every metric in the default
registry. Any canary value, any JWT-shaped string or any bearer credential found is a leak.

The canary values are planted by tests/observability/test_canaries.py (and used by other
observability tests): a bearer token, an opaque bearer credential, a TOTP code, an
idempotency key, an API key, a PII field value and a raw path segment (a raw path may
appear in a framework's own HTTP server span, `url.path`, but never in policyroute's
spans, its logs or any metric label).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import REGISTRY

from policyroute.observability.export import SanitizingExporter
from policyroute.observability.logs import JsonFormatter

CANARY_OPAQUE = "canaryOpaqueCred7Qx3"
CANARY_TOTP = "73915086"  # eight digits: the canary routes set totp digits 8
CANARY_IDEM = "canary-idem-key-7Qx3"
CANARY_API_KEY = "canary-api-key-7Qx3"
CANARY_EMAIL = "canary.pii.7Qx3@example.test"
CANARY_PATH = "canary-path-7Qx3"
CANARIES = (CANARY_OPAQUE, CANARY_IDEM, CANARY_API_KEY, CANARY_EMAIL, CANARY_PATH)

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.")
_DIGITS = re.compile(rf"(?<!\d){CANARY_TOTP}(?!\d)")


def leaks(text: str, *, paths: bool = True) -> list[str]:
    """What in `text` must never have been there (raw paths only where `paths`)."""
    found = [c for c in CANARIES if c in text and (paths or c != CANARY_PATH)]
    if _DIGITS.search(text):
        found.append(CANARY_TOTP)
    if _JWT.search(text):
        found.append("a JWT")
    return found


@dataclass
class Findings:
    """Leaks seen so far, by sink, with where they were seen."""

    logs: list[str] = field(default_factory=list)
    spans: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    scanned: dict[str, int] = field(default_factory=lambda: {"logs": 0, "spans": 0, "metrics": 0})

    def all(self) -> list[str]:
        """Every leak found."""
        return self.logs + self.spans + self.metrics


FINDINGS = Findings()


def _scan_span(span: ReadableSpan, where: str, paths: bool) -> None:
    FINDINGS.scanned["spans"] += 1
    parts = [span.name, span.status.description or ""]
    parts += [f"{k}={v!s}" for k, v in (span.attributes or {}).items()]
    for event in span.events:
        parts.append(event.name)
        parts += [f"{k}={v!s}" for k, v in (event.attributes or {}).items()]
    for leak in leaks(" ".join(parts), paths=paths):
        FINDINGS.spans.append(f"{where} span {span.name!r}: {leak}: {' '.join(parts)[:400]}")


class Exported(SpanExporter):
    """Scans every span as the application's exporter would receive it."""

    def export(self, spans: Any) -> SpanExportResult:
        """Scan a batch."""
        for span in spans:
            # A framework's HTTP server span names the raw path (url.path) by design.
            _scan_span(span, "exported", paths=False)
        return SpanExportResult.SUCCESS


class Recorder(SpanProcessor):
    """Scans policyroute's spans as recorded; keeps every span while a test asks."""

    def __init__(self) -> None:
        self.kept: list[ReadableSpan] | None = None

    def on_start(self, span: Span, parent_context: OtelContext | None = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Scan policyroute's span unsanitized, and keep any span when a test is recording."""
        scope = span.instrumentation_scope
        if scope is not None and scope.name == "policyroute":
            _scan_span(span, "recorded", paths=True)
        if self.kept is not None:
            self.kept.append(span)

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Spans are handled as they end."""
        return True


RECORDER = Recorder()


@contextlib.contextmanager
def recording() -> Iterator[list[ReadableSpan]]:
    """The spans that end inside the block."""
    RECORDER.kept = []
    try:
        yield RECORDER.kept
    finally:
        RECORDER.kept = None


class Scanner(logging.Handler):
    """Formats every record as the JSON lines would show it, and scans it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.paused = False

    def emit(self, record: logging.LogRecord) -> None:
        """Scan one record."""
        if self.paused:
            return
        FINDINGS.scanned["logs"] += 1
        text = self.format(record)
        for leak in leaks(text):
            FINDINGS.logs.append(f"log {record.name} {record.levelname}: {leak}: {text[:300]}")


SCANNER = Scanner()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Stop scanning logs (for a test that feeds raw secrets to its own handler on purpose)."""
    SCANNER.paused = True
    try:
        yield
    finally:
        SCANNER.paused = False


def scan_metrics() -> None:
    """Scan every label value of every metric in the default registry."""
    seen = 0
    for family in REGISTRY.collect():
        for sample in family.samples:
            seen += 1
            for leak in leaks(" ".join(sample.labels.values())):
                FINDINGS.metrics.append(f"metric {sample.name}{sample.labels}: {leak}")
    FINDINGS.scanned["metrics"] = seen


def install() -> Any:
    """Trace with the SDK and scan logs, for the whole session."""
    provider = TracerProvider()
    provider.add_span_processor(RECORDER)
    provider.add_span_processor(SimpleSpanProcessor(SanitizingExporter(Exported())))
    trace.set_tracer_provider(provider)
    logging.getLogger().addHandler(SCANNER)
    logging.getLogger("policyroute").setLevel(logging.DEBUG)
    logging.getLogger("policyroute.pulsar").setLevel(logging.INFO)  # the C++ client's chatter
    return provider


@contextlib.contextmanager
def watch() -> Iterator[Findings]:
    """The session: everything traced and scanned; fail at the end on any leak."""
    provider = install()
    try:
        yield FINDINGS
    finally:
        logging.getLogger().removeHandler(SCANNER)
        provider.shutdown()
        scan_metrics()
    leaked = FINDINGS.all()
    assert not leaked, "secrets reached logs, spans or metric labels:\n" + "\n".join(leaked[:20])
