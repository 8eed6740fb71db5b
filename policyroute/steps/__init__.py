"""Steps: one policy key, one small class, one module."""

from .base import Context, Handler, Step

__all__ = ["Context", "Handler", "Step"]
