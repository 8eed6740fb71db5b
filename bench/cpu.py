"""CPU pinning: the server under test gets one CPU, everything else the others."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CpuPlan:
    """Which CPUs the server and the rest (generator, Valkey, harness) run on."""

    server: frozenset[int]
    others: frozenset[int]

    def describe(self) -> str:
        """Return a short human-readable form, e.g. ``server=0 others=1``."""
        if not self.server:
            return "not pinned"
        return f"server={_cpus(self.server)} others={_cpus(self.others)}"


NO_PINNING = CpuPlan(frozenset(), frozenset())


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def plan() -> CpuPlan:
    """Split the CPUs this process may use; no pinning with fewer than two."""
    if not hasattr(os, "sched_getaffinity"):
        return NO_PINNING
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return NO_PINNING
    return CpuPlan(frozenset(cpus[:1]), frozenset(cpus[1:]))


def pin_self(cpus: frozenset[int]) -> None:
    """Pin this process (and so every child it starts later) to ``cpus``."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def pinner(cpus: frozenset[int]) -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that pins a child to ``cpus``, or None for no pinning."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)
