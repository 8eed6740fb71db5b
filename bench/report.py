"""The results table and its JSON twin."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.runner import Outcome
from bench.scenarios import BASELINE
from bench.targets import Verdict, paired_ratio

HEADER = (
    "scenario",
    "generator",
    "req/s",
    "p50 ms",
    "p99 ms",
    "vs bare",
    "cpu us/req",
    "cpu vs bare",
    "busy",
    "valkey us/req",
    "errors",
)
TARGET_HEADER = ("target", "measured", "from", "status")
MISSING = "-"


def baseline_rps(outcomes: Sequence[Outcome]) -> float | None:
    """Return the baseline scenario's req/s, if it ran and succeeded."""
    found = baseline(outcomes)
    return found.result.rps if found is not None and found.result is not None else None


def baseline(outcomes: Sequence[Outcome]) -> Outcome | None:
    """Return the baseline scenario's outcome, if it ran and succeeded."""
    for outcome in outcomes:
        if outcome.scenario == BASELINE and outcome.result is not None:
            return outcome
    return None


def baseline_cpu(outcomes: Sequence[Outcome]) -> float | None:
    """Return the baseline scenario's server CPU µs per request, if measured."""
    for outcome in outcomes:
        if outcome.scenario == BASELINE and outcome.cpu_us:
            return outcome.cpu_us
    return None


def ratio(outcome: Outcome, base: float | None, paired_with: Outcome | None = None) -> float | None:
    """Return the outcome's req/s as a fraction of the baseline's (paired by round if it can)."""
    if outcome.result is None or not base:
        return None
    paired = paired_ratio(outcome, paired_with) if paired_with is not None else None
    return paired if paired is not None else outcome.result.rps / base


def row(
    outcome: Outcome,
    base: float | None,
    cpu_base: float | None = None,
    paired_with: Outcome | None = None,
) -> tuple[str, ...]:
    """Return one table row as strings (`cpu vs bare` is bare's CPU per request over this one's)."""
    result = outcome.result
    if result is None:
        return (outcome.scenario, outcome.generator, "FAILED", *([MISSING] * (len(HEADER) - 3)))
    share = ratio(outcome, base, paired_with)
    cpu = outcome.cpu_us
    cpu_share = paired_ratio(outcome, paired_with, cpu=True) if paired_with is not None else None
    if cpu_share is None and cpu and cpu_base:
        cpu_share = cpu_base / cpu
    return (
        outcome.scenario,
        outcome.generator,
        f"{result.rps:.0f}",
        f"{result.p50_ms:.2f}",
        f"{result.p99_ms:.2f}",
        MISSING if share is None else f"{share:.2f}",
        MISSING if not cpu else f"{cpu:.0f}",
        MISSING if cpu_share is None else f"{cpu_share:.2f}",
        MISSING if not cpu else f"{busy(result.rps, cpu):.0%}",
        MISSING if outcome.backend_us is None else f"{outcome.backend_us:.0f}",
        str(result.errors),
    )


def busy(rps: float, cpu_us: float) -> float:
    """The share of the run the server spent on a CPU: below 100 % it waited for something.

    A server that is not kept busy (its requests wait on a backend that shares a CPU with
    the generator) reports less than its capacity: compare req/s of saturated runs.
    """
    return rps * cpu_us / 1e6


def table(outcomes: Sequence[Outcome]) -> str:
    """Return the aligned text table, left columns left-aligned and numbers right-aligned."""
    base = baseline_rps(outcomes)
    cpu_base = baseline_cpu(outcomes)
    pair = baseline(outcomes)
    rows = [HEADER, *(row(o, base, cpu_base, pair) for o in outcomes)]
    return _aligned(rows, left=2)


def _aligned(rows: Sequence[tuple[str, ...]], left: int) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(_line(r, widths, left) for r in rows)


def _line(cells: tuple[str, ...], widths: list[int], left: int) -> str:
    text = [
        c.ljust(w) if i < left else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(text).rstrip()


def target_row(verdict: Verdict) -> tuple[str, ...]:
    """Return one row of the targets section: what it was measured from, or why it was not."""
    value = verdict.value
    if value is None:
        return (verdict.goal.label, MISSING, verdict.reason, verdict.status)
    return (verdict.goal.label, verdict.goal.shown(value), verdict.figures, verdict.status)


def targets_table(verdicts: Sequence[Verdict]) -> str:
    """Return the targets section (reported, not enforced), or "" when none applies."""
    if not verdicts:
        return ""
    rows = [TARGET_HEADER, *(target_row(v) for v in verdicts)]
    return "targets (reported, not enforced):\n" + _aligned(rows, left=1)


def failures(outcomes: Sequence[Outcome]) -> str:
    """Return each failed scenario's reason and log tail, or an empty string."""
    parts = [_failure(o) for o in outcomes if o.result is None]
    return "\n\n".join(parts)


def _failure(outcome: Outcome) -> str:
    text = f"{outcome.scenario} FAILED: {outcome.failure}"
    if outcome.log_tail:
        text += "\n" + "\n".join(f"    {line}" for line in outcome.log_tail.splitlines())
    return text


def document(
    outcomes: Sequence[Outcome], meta: Mapping[str, Any], verdicts: Sequence[Verdict] = ()
) -> dict[str, Any]:
    """Return the JSON document: the run's settings, one entry per scenario, the targets."""
    base = baseline_rps(outcomes)
    pair = baseline(outcomes)
    return {
        **meta,
        "results": [_entry(o, base, pair) for o in outcomes],
        "targets": [v.as_json() for v in verdicts],
    }


def _entry(outcome: Outcome, base: float | None, pair: Outcome | None) -> dict[str, Any]:
    return {
        "scenario": outcome.scenario,
        "generator": outcome.generator,
        "status": "ok" if outcome.result is not None else "FAILED",
        **(asdict(outcome.result) if outcome.result is not None else {}),
        "ratio_to_bare": ratio(outcome, base, pair),
        "rounds": [asdict(r) for r in outcome.rounds],
        "failure": outcome.failure or None,
        "log_tail": outcome.log_tail or None,
    }


def write_json(
    path: Path,
    outcomes: Sequence[Outcome],
    meta: Mapping[str, Any],
    verdicts: Sequence[Verdict] = (),
) -> None:
    """Write the JSON document to ``path``."""
    text = json.dumps(document(outcomes, meta, verdicts), indent=2) + "\n"
    path.write_text(text, encoding="utf-8")
