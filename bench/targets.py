"""Throughput targets: one scenario's req/s against a multiple of another's.

Targets are reported, not enforced: a miss never changes the exit status.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.runner import Outcome
from bench.scenarios import BASELINE

MET = "PASS"
MISSED = "MISS"


@dataclass(frozen=True, slots=True)
class Goal:
    """``scenario`` req/s must reach ``factor`` times ``reference`` req/s (exceed it if strict)."""

    scenario: str
    reference: str
    factor: float
    strict: bool = False

    @property
    def label(self) -> str:
        """Return the goal as one line, e.g. ``policyroute_full >= 0.65 x bare``."""
        return f"{self.scenario} {'>' if self.strict else '>='} {self.factor:g} x {self.reference}"

    def met_by(self, ratio: float) -> bool:
        """Tell whether the measured ratio ``scenario / reference`` meets the goal."""
        return ratio > self.factor if self.strict else ratio >= self.factor


GOALS: tuple[Goal, ...] = (
    Goal("policyroute_local", "bare", 0.85),
    Goal("policyroute_full", "bare", 0.65),
    Goal("policyroute_full", "slowapi", 2.0),
    # A cache hit through the whole chain must beat a handler that awaits 1 ms: one
    # connection, so req/s is one over the round trip and the saved wait counts.
    Goal("policyroute_cache_hit_1conn", "bare_sleep_1ms_1conn", 1.0, strict=True),
    # Tracing every request with the OpenTelemetry SDK (policyroute's spans only) keeps at
    # least 60 % of the full chain's throughput with the SDK off; a sampler lowers the cost.
    Goal("policyroute_full_otel_own", "policyroute_full", 0.6),
)


# Under uvloop and httptools bare FastAPI is fast enough that the chain's own cost shows:
# the targets of production serving.
PRODUCTION_GOALS: tuple[Goal, ...] = (
    Goal("policyroute_local", "bare", 0.90),
    Goal("policyroute_full", "bare", 0.70),
    Goal("policyroute_full", "slowapi", 2.3),
    Goal("policyroute_cache_hit_1conn", "bare_sleep_1ms_1conn", 1.0, strict=True),
)

GOALS_OF_SETUP: dict[str, tuple[Goal, ...]] = {"plain": GOALS, "production": PRODUCTION_GOALS}


@dataclass(frozen=True, slots=True)
class Verdict:
    """A goal and what was measured for it; a failed scenario has no req/s."""

    goal: Goal
    scenario_rps: float | None
    reference_rps: float | None
    paired: float | None = None  # the median of per-round ratios, when rounds were paired

    @property
    def ratio(self) -> float | None:
        """Return ``scenario / reference`` req/s (paired by round when it can), or None."""
        if self.scenario_rps is None or not self.reference_rps:
            return None
        if self.paired is not None:
            return self.paired
        return self.scenario_rps / self.reference_rps

    @property
    def status(self) -> str:
        """Return ``PASS`` or ``MISS`` (a goal without a measurement is missed)."""
        ratio = self.ratio
        return MET if ratio is not None and self.goal.met_by(ratio) else MISSED

    def as_json(self) -> dict[str, Any]:
        """Return the verdict as a JSON object."""
        return {
            "target": self.goal.label,
            "scenario": self.goal.scenario,
            "reference": self.goal.reference,
            "factor": self.goal.factor,
            "comparison": ">" if self.goal.strict else ">=",
            "scenario_rps": self.scenario_rps,
            "reference_rps": self.reference_rps,
            "ratio": self.ratio,
            "status": self.status,
        }


def evaluate(outcomes: Sequence[Outcome], goals: Sequence[Goal] = GOALS) -> list[Verdict]:
    """Return a verdict per goal whose two scenarios both ran; the rest are skipped."""
    ran: Mapping[str, Outcome] = {o.scenario: o for o in outcomes}
    verdicts = []
    for goal in goals:
        scenario, reference = ran.get(goal.scenario), ran.get(goal.reference)
        if scenario is None or reference is None:
            continue
        verdicts.append(
            Verdict(goal, _rps(scenario), _rps(reference), paired_ratio(scenario, reference))
        )
    return verdicts


def paired_ratio(scenario: Outcome, reference: Outcome, cpu: bool = False) -> float | None:
    """The median over rounds of ``scenario / reference`` in the same round, or None.

    Rounds interleave the scenarios, so one round's two runs are close in time: a machine
    that slows down for a minute moves both sides of the pair, not just one. Against the
    baseline, each round's baseline is the one interpolated to the scenario's place in the
    round (it runs first and last). With ``cpu``, the ratio is of CPU time per request,
    reference over scenario (higher is better alike).
    """
    if not scenario.rounds or len(scenario.rounds) != len(reference.rounds):
        return None
    against_base = reference.scenario == BASELINE and all(
        r.base_rps is not None for r in scenario.rounds
    )
    ratios = []
    for mine, theirs in zip(scenario.rounds, reference.rounds, strict=True):
        ref_rps = mine.base_rps if against_base else theirs.rps
        ref_cpu = mine.base_cpu if against_base else theirs.cpu_us
        if cpu:
            if not mine.cpu_us or not ref_cpu:
                return None
            ratios.append(ref_cpu / mine.cpu_us)
        elif ref_rps:
            ratios.append(mine.rps / ref_rps)
    return statistics.median(ratios) if ratios else None


def _rps(outcome: Outcome) -> float | None:
    return outcome.result.rps if outcome.result is not None else None
