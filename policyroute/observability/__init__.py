"""Observability: OpenTelemetry spans, Prometheus metrics, sanitized JSON logs, health routes.

The bound chain (`policyroute/asgi/chain.py`) uses these on every request; applications use
`configure_logging`, `sanitize_logger`, `add_routes` and `set_provider`. Submodules load
on first use, so importing this package costs nothing.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "JsonFormatter": "logs",
    "LogFilter": "logs",
    "configure_logging": "logs",
    "sanitize_logger": "logs",
    "scrub": "logs",
    "set_provider": "tracing",
    "add_routes": "health",
    "readiness": "health",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
