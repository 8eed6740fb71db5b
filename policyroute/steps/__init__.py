"""Steps: one policy key, one small class, one module."""

from __future__ import annotations

import importlib

from ..compile.step import Context, Handler, Step

# The modules that register a maker, in request-path order (deny cheap before expensive).
# The compiler knows no step module: `policyroute` calls `load_builtin()`, which imports
# them (each registers its maker with `compiler.register`) and puts the makers in order.
BUILTIN = (
    "client",
    "ip_allowlist",
    "auth",
    "scopes",
    "roles",
    "mfa",
    "request",
    "replay",
    "state",
    "fields",
    "events",
    "resilience",
    "slow",
)


def load_builtin() -> None:
    """Import every built-in step module (idempotent) and put the makers in path order.

    Other modules may import a step module first (for its helpers), which registers
    its maker early; the order of the request path is BUILTIN's, never import order.
    """
    for name in BUILTIN:
        importlib.import_module(f"{__name__}.{name}")
    from ..compile.compiler import MAKERS

    def rank(item: tuple[object, object]) -> int:
        module = str(getattr(item[1], "__module__", ""))
        prefix, _, name = module.rpartition(".")
        return BUILTIN.index(name) if prefix == __name__ and name in BUILTIN else len(BUILTIN)

    MAKERS.sort(key=rank)


__all__ = ["BUILTIN", "Context", "Handler", "Step", "load_builtin"]
