"""Targets: a ratio of two scenarios' req/s, a difference of their CPU, or one measure's bound.

Targets are reported, not enforced: a miss never changes the exit status.
"""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from bench.runner import Outcome, Round
from bench.scenarios import BASELINE

MET = "PASS"
MISSED = "MISS"

Measure = Literal["rps", "cpu_us", "valkey_us"]
# Each measure as the results table names its column.
MEASURES: dict[Measure, str] = {
    "rps": "req/s",
    "cpu_us": "cpu us/req",
    "valkey_us": "valkey us/req",
}


class Goal(Protocol):
    """A target: the scenarios it needs, its line, its bound and how it is measured."""

    @property
    def scenario(self) -> str:
        """The scenario the target is about."""

    @property
    def reference(self) -> str | None:
        """The scenario it is measured against; None when the scenario stands alone."""

    @property
    def label(self) -> str:
        """The target as one line, e.g. ``policyroute_full >= 0.7 x bare``."""

    def met_by(self, value: float) -> bool:
        """Tell whether the measured value meets the target."""

    def shown(self, value: float) -> str:
        """Return the measured value as the targets table prints it."""

    def assess(self, ran: Mapping[str, Outcome]) -> Verdict:
        """Measure the target on the outcomes of its scenarios (all of them in ``ran``)."""

    def as_json(self) -> dict[str, Any]:
        """Return what the target compares, as a JSON object."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A goal and what was measured for it; without a value, why not (then it is missed)."""

    goal: Goal
    value: float | None
    # The two scenarios' figures of the goal's measure as the table shows them (median round).
    scenario_value: float | None = None
    reference_value: float | None = None
    figures: str = ""  # what the value was taken from, as printed
    reason: str = ""  # why there is no value: a scenario failed or lacks the measure

    @property
    def status(self) -> str:
        """Return ``PASS`` or ``MISS`` (a goal without a measurement is missed)."""
        return MET if self.value is not None and self.goal.met_by(self.value) else MISSED

    def as_json(self) -> dict[str, Any]:
        """Return the verdict as a JSON object."""
        return {
            "target": self.goal.label,
            **self.goal.as_json(),
            "measured": self.value,
            "scenario_value": self.scenario_value,
            "reference_value": self.reference_value,
            "status": self.status,
            "reason": self.reason or None,
        }


@dataclass(frozen=True, slots=True)
class Ratio:
    """``scenario`` req/s must reach ``factor`` times ``reference`` req/s (exceed it if strict)."""

    scenario: str
    reference: str
    factor: float
    strict: bool = False

    @property
    def label(self) -> str:
        """Return the goal as one line, e.g. ``policyroute_full >= 0.65 x bare``."""
        return f"{self.scenario} {self._comparison} {self.factor:g} x {self.reference}"

    @property
    def _comparison(self) -> str:
        return ">" if self.strict else ">="

    def met_by(self, value: float) -> bool:
        """Tell whether the measured ratio ``scenario / reference`` meets the goal."""
        return value > self.factor if self.strict else value >= self.factor

    def shown(self, value: float) -> str:
        """Return the ratio as printed, e.g. ``0.72 x``."""
        return f"{value:.2f} x"

    def assess(self, ran: Mapping[str, Outcome]) -> Verdict:
        """Measure ``scenario / reference`` req/s, the median of per-round ratios if it can."""
        return _compared(self, ran[self.scenario], ran[self.reference], "rps", operator.truediv)

    def as_json(self) -> dict[str, Any]:
        """Return what the goal compares, as a JSON object."""
        return _described(self, "ratio", "rps", self._comparison, self.factor)


@dataclass(frozen=True, slots=True)
class CpuOver:
    """``scenario``'s worker CPU per request may exceed ``reference``'s by ``most_us`` µs."""

    scenario: str
    reference: str
    most_us: float

    @property
    def label(self) -> str:
        """Return the goal as one line, e.g. ``policyroute_full cpu us/req <= bare + 55``."""
        return f"{self.scenario} {MEASURES['cpu_us']} <= {self.reference} + {self.most_us:g}"

    def met_by(self, value: float) -> bool:
        """Tell whether the measured difference ``scenario - reference`` meets the goal."""
        return value <= self.most_us

    def shown(self, value: float) -> str:
        """Return the difference as printed, e.g. ``+48.2 us``."""
        return f"{value:+.1f} us"

    def assess(self, ran: Mapping[str, Outcome]) -> Verdict:
        """Measure ``scenario - reference`` CPU µs per request, the median of per-round ones."""
        return _compared(self, ran[self.scenario], ran[self.reference], "cpu_us", operator.sub)

    def as_json(self) -> dict[str, Any]:
        """Return what the goal compares, as a JSON object."""
        return _described(self, "difference", "cpu_us", "<=", self.most_us)


@dataclass(frozen=True, slots=True)
class AtMost:
    """``scenario``'s ``measure`` (µs per request) must be at most ``most``."""

    scenario: str
    measure: Literal["cpu_us", "valkey_us"]
    most: float

    @property
    def reference(self) -> None:
        """No reference: the scenario stands alone."""
        return None

    @property
    def label(self) -> str:
        """Return the goal as one line, e.g. ``policyroute_full valkey us/req <= 25``."""
        return f"{self.scenario} {MEASURES[self.measure]} <= {self.most:g}"

    def met_by(self, value: float) -> bool:
        """Tell whether the measured value is within the bound."""
        return value <= self.most

    def shown(self, value: float) -> str:
        """Return the value as printed, e.g. ``22.4 us``."""
        return f"{value:.1f} us"

    def assess(self, ran: Mapping[str, Outcome]) -> Verdict:
        """Measure the scenario's figure: the median over its rounds when every one has it."""
        outcome = ran[self.scenario]
        mine = figure(outcome, self.measure)
        if mine is None:
            return Verdict(self, None, reason=_lacking(self.measure, outcome))
        rounds = [_round_figure(r, self.measure) for r in outcome.rounds]
        every = [v for v in rounds if v is not None]
        if every and len(every) == len(rounds):
            value, figures = statistics.median(every), f"median of {len(every)} rounds"
        else:
            value, figures = mine, "one round"
        return Verdict(self, value, mine, figures=figures)

    def as_json(self) -> dict[str, Any]:
        """Return what the goal bounds, as a JSON object."""
        return _described(self, "bound", self.measure, "<=", self.most)


GOALS: tuple[Goal, ...] = (
    Ratio("policyroute_local", "bare", 0.85),
    Ratio("policyroute_full", "bare", 0.65),
    Ratio("policyroute_full", "slowapi", 2.0),
    # A cache hit through the whole chain must beat a handler that awaits 1 ms: one
    # connection, so req/s is one over the round trip and the saved wait counts.
    Ratio("policyroute_cache_hit_1conn", "bare_sleep_1ms_1conn", 1.0, strict=True),
    # Tracing every request with the OpenTelemetry SDK (policyroute's spans only) keeps at
    # least 60 % of the full chain's throughput with the SDK off; a sampler lowers the cost.
    Ratio("policyroute_full_otel_own", "policyroute_full", 0.6),
)


# Under uvloop and httptools bare FastAPI is fast enough that the chain's own cost shows:
# the targets of production serving.
PRODUCTION_GOALS: tuple[Goal, ...] = (
    Ratio("policyroute_local", "bare", 0.90),
    Ratio("policyroute_full", "bare", 0.70),
    Ratio("policyroute_full", "slowapi", 2.3),
    # What the whole chain adds to the worker's CPU per request, whatever bare costs.
    CpuOver("policyroute_full", "bare", 55),
    # Valkey's CPU per request: the full chain's state and finish calls, and one token bucket.
    AtMost("policyroute_full", "valkey_us", 25),
    AtMost("policyroute_limit", "valkey_us", 10),
    Ratio("policyroute_cache_hit_1conn", "bare_sleep_1ms_1conn", 2.5),
)

GOALS_OF_SETUP: dict[str, tuple[Goal, ...]] = {"plain": GOALS, "production": PRODUCTION_GOALS}


def evaluate(outcomes: Sequence[Outcome], goals: Sequence[Goal] = GOALS) -> list[Verdict]:
    """Return a verdict per goal whose scenarios all ran; the rest are skipped."""
    ran: Mapping[str, Outcome] = {o.scenario: o for o in outcomes}
    return [goal.assess(ran) for goal in goals if all(name in ran for name in needs(goal))]


def needs(goal: Goal) -> tuple[str, ...]:
    """Return the scenarios a goal is measured on."""
    return (goal.scenario,) if goal.reference is None else (goal.scenario, goal.reference)


def figure(outcome: Outcome, measure: Measure) -> float | None:
    """Return the outcome's figure of ``measure`` (its median round), or None without one."""
    if outcome.result is None:
        return None
    if measure == "rps":
        return outcome.result.rps or None
    if measure == "cpu_us":
        return outcome.cpu_us or None
    return outcome.backend_us  # Valkey may well spend nothing on a request


def paired(
    scenario: Outcome,
    reference: Outcome,
    measure: Measure,
    combine: Callable[[float, float], float],
) -> float | None:
    """The median over rounds of ``combine(scenario's, reference's)`` in the same round, or None.

    Rounds interleave the scenarios, so one round's two runs are close in time: a machine
    that slows down for a minute moves both sides of the pair, not just one. Against the
    baseline, each round's baseline is the one interpolated to the scenario's place in the
    round (it runs first and last). None when the rounds do not pair or one lacks a figure.
    """
    if not scenario.rounds or len(scenario.rounds) != len(reference.rounds):
        return None
    against_base = reference.scenario == BASELINE and all(
        r.base_rps is not None for r in scenario.rounds
    )
    values = []
    for mine, theirs in zip(scenario.rounds, reference.rounds, strict=True):
        own = _round_figure(mine, measure)
        other = _base_figure(mine, measure) if against_base else _round_figure(theirs, measure)
        if own is None or other is None:
            return None
        values.append(combine(own, other))
    return statistics.median(values)


def paired_ratio(scenario: Outcome, reference: Outcome, cpu: bool = False) -> float | None:
    """The median over rounds of ``scenario / reference`` req/s in the same round, or None.

    With ``cpu``, the ratio is of CPU time per request, reference over scenario (higher is
    better alike).
    """
    if cpu:
        return paired(scenario, reference, "cpu_us", lambda mine, ref: ref / mine)
    return paired(scenario, reference, "rps", operator.truediv)


def _round_figure(entry: Round, measure: Measure) -> float | None:
    if measure == "rps":
        return entry.rps or None
    if measure == "cpu_us":
        return entry.cpu_us or None
    return entry.backend_us


def _base_figure(entry: Round, measure: Measure) -> float | None:
    if measure == "rps":
        return entry.base_rps or None
    if measure == "cpu_us":
        return entry.base_cpu or None
    return None  # the baseline's Valkey time is not interpolated: no goal pairs it


def _compared(
    goal: Goal,
    scenario: Outcome,
    reference: Outcome,
    measure: Measure,
    combine: Callable[[float, float], float],
) -> Verdict:
    """Measure ``combine(scenario, reference)``: paired by round, else of the median rounds."""
    mine, theirs = figure(scenario, measure), figure(reference, measure)
    if mine is None or theirs is None:
        return Verdict(goal, None, mine, theirs, reason=_lacking(measure, scenario, reference))
    value = paired(scenario, reference, measure, combine)
    return Verdict(
        goal,
        combine(mine, theirs) if value is None else value,
        mine,
        theirs,
        f"{mine:.0f} vs {theirs:.0f} {MEASURES[measure]}",
    )


def _lacking(measure: Measure, *outcomes: Outcome) -> str:
    """Why the outcomes give no figure of ``measure``: a failed scenario, or a missing figure."""
    failed = [o.scenario for o in outcomes if o.result is None]
    if failed:
        return f"{', '.join(failed)} FAILED"
    absent = ", ".join(o.scenario for o in outcomes if figure(o, measure) is None)
    return f"no {MEASURES[measure]} for {absent}"


def _described(
    goal: Goal, kind: str, measure: Measure, comparison: str, bound: float
) -> dict[str, Any]:
    return {
        "kind": kind,
        "scenario": goal.scenario,
        "reference": goal.reference,
        "measure": measure,
        "comparison": comparison,
        "bound": bound,
    }
