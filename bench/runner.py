"""Run one scenario: start its server, warm up, measure, stop."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bench import server
from bench.loadgen import LoadError, LoadGenerator, LoadResult, Target
from bench.scenarios import Scenario


@dataclass(frozen=True, slots=True)
class Settings:
    """What every scenario of one run shares."""

    duration_s: int
    warmup_s: int
    connections: int
    threads: int
    server_cpus: frozenset[int]
    env: Mapping[str, str]
    # The shared Valkey server's CPU time so far, measured per request too.
    backend_cpu: Callable[[], float] | None = None
    setup: str = "plain"  # the server setup (`server.SETUPS`)
    valkey_allocator: str = "unknown"  # what the shared Valkey ran with (`backend.py`)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A scenario's measurement, or why it has none."""

    scenario: str
    generator: str
    result: LoadResult | None
    failure: str = ""
    log_tail: str = ""
    # The server process's CPU time per request in the timed run (µs): steadier than req/s
    # on a shared machine, since waiting for a CPU costs no CPU time.
    cpu_us: float | None = None
    # Valkey's CPU time per request in the same run (µs): the backend's share of the work.
    backend_us: float | None = None
    # Every round's figures, in round order (interleaved runs only), so ratios can be taken
    # round by round: both sides of a pair ran minutes apart at most.
    rounds: tuple[Round, ...] = ()
    # The baseline as it stood when this run was made (see `Round`), set by the harness.
    base: tuple[float, float | None] | None = None


@dataclass(frozen=True, slots=True)
class Round:
    """One round of a scenario: req/s, CPU µs per request, the baseline's then, Valkey's µs.

    The baseline runs first and last in every round; `base_*` is interpolated between the
    two by the scenario's place in the round, so a machine that drifts during the round
    moves both sides of the pair (None when the round had no baseline).
    """

    rps: float
    cpu_us: float | None = None
    base_rps: float | None = None
    base_cpu: float | None = None
    backend_us: float | None = None  # Valkey's CPU µs per request in this round


def measure(
    generator: LoadGenerator, target: Target, settings: Settings, pid: int | None = None
) -> tuple[LoadResult, float | None, float | None]:
    """Warm the server up, then return the timed run and the server's and Valkey's CPU µs
    per request."""
    if settings.warmup_s > 0:
        generator.run(target, settings.warmup_s, settings.threads)
    before = _cpu_now(pid, settings.backend_cpu)
    result = generator.run(target, settings.duration_s, settings.threads)
    after = _cpu_now(pid, settings.backend_cpu)
    server_us, backend_us = (
        None if b is None or a is None or not result.requests
        else (a - b) / result.requests * 1e6
        for b, a in zip(before, after, strict=True)
    )
    return result, server_us, backend_us


def _cpu_now(
    pid: int | None, backend: Callable[[], float] | None
) -> tuple[float | None, float | None]:
    """CPU seconds used so far by the server under test and by Valkey (None: unknown)."""
    return (
        server.cpu_seconds(pid) if pid is not None else None,
        backend() if backend is not None else None,
    )


def run(scenario: Scenario, generator: LoadGenerator, settings: Settings) -> Outcome:
    """Run ``scenario`` and return its outcome; a failure is reported, not raised."""
    try:
        with server.serve(scenario, settings.env, settings.server_cpus, settings.setup) as running:
            target = Target(
                server.HOST,
                running.port,
                scenario.path,
                scenario.headers,
                scenario.connections or settings.connections,
                scenario.unique_query,
            )
            result, cpu_us, backend_us = measure(generator, target, settings, running.pid)
    except server.ServerError as error:
        return Outcome(scenario.name, generator.name, None, str(error), error.log_tail)
    except LoadError as error:
        return Outcome(scenario.name, generator.name, None, str(error))
    return Outcome(scenario.name, generator.name, result, cpu_us=cpu_us, backend_us=backend_us)
