"""What a load generator is given and what it reports."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Protocol

from bench.scenarios import Pairs

CONNECTIONS = 32
# The query parameter that makes each request unique (`?n=<run>-...`); the apps ignore it.
QUERY_NAME = "n"


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send the repeated ``GET``, with which headers, and whether each is unique.

    With ``unique_query`` every request's path gets its own ``n=<run>-<counter>`` query.
    """

    host: str
    port: int
    path: str
    headers: Pairs = ()
    connections: int = CONNECTIONS
    unique_query: bool = False

    @property
    def url(self) -> str:
        """Return the full ``http://`` URL of the request."""
        return f"http://{self.host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Throughput and latency of one timed run."""

    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float


class LoadGenerator(Protocol):
    """Something that drives a target for a number of seconds."""

    name: str

    def run(self, target: Target, seconds: int, threads: int) -> LoadResult:
        """Drive ``target`` for ``seconds`` and report what was measured."""
        ...


def query_prefix(path: str, run: str) -> str:
    """Return ``path`` and the start of its unique query, e.g. ``/ping?n=<run>-``."""
    separator = "&" if "?" in path else "?"
    return f"{path}{separator}{QUERY_NAME}={run}-"


def run_id() -> str:
    """Return a fresh token, so no two runs (a warm-up and its measurement) share a query."""
    return secrets.token_hex(4)


class LoadError(Exception):
    """The load generator failed or printed something it could not parse."""


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of already sorted values (0 if empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
