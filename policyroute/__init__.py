"""policyroute: declarative endpoint policies for FastAPI."""

from __future__ import annotations

# First: no compiled module may load unless it was built from these sources (_compiled.py).
from ._compiled import NATIVE as NATIVE
from ._version import __version__ as __version__
from .compile.chain import Chain
from .config import Settings
from .engine.engine import Engine
from .engine.install import install
from .errors import ConfigError, Denial, Finding, PolicyrouteError, StorageError
from .events import Message, Worker, consumer, consumers
from .language.loader import PolicySet, load_policies
from .principal import Principal, principal
from .resilience import resilient
from .steps import load_builtin as _load_builtin

_load_builtin()  # the step modules register their makers with the compiler

__all__ = [
    "Chain",
    "ConfigError",
    "Denial",
    "Engine",
    "Finding",
    "Message",
    "PolicySet",
    "PolicyrouteError",
    "Principal",
    "Settings",
    "StorageError",
    "Worker",
    "consumer",
    "consumers",
    "install",
    "load_policies",
    "principal",
    "resilient",
]
