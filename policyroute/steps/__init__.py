"""Steps: one policy key, one small class, one module."""

from __future__ import annotations

import importlib

from .base import Context, Handler, Step

# The modules that register a maker, in request-path order (deny cheap before expensive).
# They import `compiler.register`, and the compiler imports this package, so they are
# loaded by `load_builtin()` once the compiler exists rather than imported here.
BUILTIN = (
    "client",
    "ip_allowlist",
    "auth",
    "scopes",
    "roles",
    "mfa",
    "state",
    "fields",
    "events",
    "resilience",
)


def load_builtin() -> None:
    """Import every built-in step module (idempotent), which registers its maker."""
    for name in BUILTIN:
        importlib.import_module(f"{__name__}.{name}")


__all__ = ["BUILTIN", "Context", "Handler", "Step", "load_builtin"]
