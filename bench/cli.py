"""Command line of ``python -m bench``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import cpu, report, runner, server, targets, wrk
from bench.apps import VALKEY_URL_ENV
from bench.backend import valkey
from bench.loadgen import CONNECTIONS, LoadGenerator
from bench.pyload import PyLoad
from bench.scenarios import BASELINE, SCENARIOS, Scenario, by_name
from bench.wrk import Wrk

RESULTS = Path(__file__).resolve().parent / "results.json"
DURATION_ENV = "BENCH_DURATION"
ROUNDS_ENV = "BENCH_ROUNDS"
CONNECTIONS_ENV = "BENCH_CONNECTIONS"
DEFAULT_DURATION_S = 4
DEFAULT_ROUNDS = 5
DEFAULT_WARMUP_S = 1
MAX_GENERATOR_THREADS = 4
DESCRIPTION = "Benchmark the same endpoint behind each policy stack, one uvicorn worker each."


def whole(minimum: int) -> Callable[[str], int]:
    """Return an argparse type for a whole number (seconds, rounds), at least ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "whole number"
    return parse


def scenario_names(text: str) -> list[str]:
    """Parse ``NAME[,NAME]`` and check every name is a known scenario."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {s.name for s in SCENARIOS}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        choices = ", ".join(sorted(known))
        raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {choices}")
    return names


def setup_names(text: str) -> list[str]:
    """Parse ``SETUP[,SETUP]`` and check every name is a known server setup."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in server.SETUPS]
    if unknown or not names:
        choices = ", ".join(server.SETUPS)
        raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {choices}")
    return names


def parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    p = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION)
    p.add_argument("--only", type=scenario_names, help="comma-separated scenario names")
    p.add_argument(
        "--duration",
        type=whole(1),
        # argparse runs a string default through `type`, so a bad variable is a usage error.
        default=os.environ.get(DURATION_ENV, str(DEFAULT_DURATION_S)),
        help=f"measured seconds per scenario (default ${DURATION_ENV} or {DEFAULT_DURATION_S})",
    )
    p.add_argument(
        "--rounds",
        type=whole(1),
        default=os.environ.get(ROUNDS_ENV, str(DEFAULT_ROUNDS)),
        help="rounds over every scenario, interleaved; each scenario reports its median "
        f"round (default ${ROUNDS_ENV} or {DEFAULT_ROUNDS})",
    )
    p.add_argument(
        "--connections",
        type=whole(1),
        default=os.environ.get(CONNECTIONS_ENV, str(CONNECTIONS)),
        help="concurrent connections of the generator (scenarios that set their own keep "
        f"theirs; default ${CONNECTIONS_ENV} or {CONNECTIONS})",
    )
    p.add_argument(
        "--warmup",
        type=whole(0),
        default=DEFAULT_WARMUP_S,
        help="warm-up seconds, 0 for none",
    )
    p.add_argument(
        "--setups",
        type=setup_names,
        default=",".join(server.SETUPS),
        help="comma-separated server setups, each measured in full: plain (--loop asyncio "
        "--http h11) and production (--loop uvloop --http httptools); default both",
    )
    p.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator; auto uses wrk when it is installed",
    )
    return p


def choose_generator(choice: str) -> LoadGenerator:
    """Return the generator asked for; ``auto`` prefers wrk."""
    if choice == "wrk" or (choice == "auto" and wrk.available()):
        return Wrk()
    return PyLoad()


def selected(names: list[str] | None) -> tuple[Scenario, ...]:
    """Return the scenarios to run."""
    return SCENARIOS if names is None else by_name(names)


def meta(
    settings: runner.Settings, generator: LoadGenerator, plan: cpu.CpuPlan, rounds: int = 1
) -> dict[str, Any]:
    """Return the run's settings as recorded next to the results."""
    loop, http = server.SETUPS[settings.setup]
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "setup": settings.setup,
        "server": f"uvicorn --loop {loop} --http {http}",
        "generator": generator.name,
        "duration_s": settings.duration_s,
        "rounds": rounds,
        "warmup_s": settings.warmup_s,
        "connections": settings.connections,
        "generator_threads": settings.threads,
        "cpu_pinning": plan.describe(),
        "python": platform.python_version(),
        "valkey_allocator": settings.valkey_allocator,
    }


def log(message: str) -> None:
    """Print a progress line on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_all(
    scenarios: tuple[Scenario, ...],
    generator: LoadGenerator,
    plan: cpu.CpuPlan,
    args: argparse.Namespace,
    setup: str = "plain",
) -> tuple[runner.Settings, list[runner.Outcome]]:
    """Start Valkey, run each scenario against a fresh database and return the outcomes."""
    with valkey() as backend:
        settings = runner.Settings(
            setup=setup,
            duration_s=args.duration,
            warmup_s=args.warmup,
            connections=args.connections,
            threads=min(MAX_GENERATOR_THREADS, max(1, len(plan.others))),
            server_cpus=plan.server,
            env={VALKEY_URL_ENV: backend.url},
            backend_cpu=backend.cpu_seconds,
            valkey_allocator=backend.allocator,
        )
        log(
            f"setup {setup}; valkey at {backend.url} ({backend.allocator} malloc); "
            f"generator {generator.name}; "
            f"cpus {plan.describe()}"
        )
        rounds: dict[str, list[runner.Outcome]] = {s.name: [] for s in scenarios}
        # Rounds interleave the scenarios, so a slow spell of the machine hits them all
        # alike instead of one scenario's whole measurement.
        for number in range(1, args.rounds + 1):
            # The baseline opens the round and closes it again, so every scenario's run can
            # be paired with the baseline as it stood at that moment (`bracket`).
            order = [*scenarios, *(s for s in scenarios if s.name == BASELINE)]
            done: list[runner.Outcome] = []
            for scenario in order:
                log(
                    f"round {number}/{args.rounds} {scenario.name}: {settings.warmup_s} s "
                    f"warm-up, {settings.duration_s} s measured"
                )
                backend.flush()
                done.append(runner.run(scenario, generator, settings))
            for outcome in bracket(done[: len(scenarios)], done[len(scenarios) :]):
                rounds[outcome.scenario].append(outcome)
    return settings, [median_round(rounds[s.name]) for s in scenarios]


def bracket(
    outcomes: list[runner.Outcome], closing: list[runner.Outcome]
) -> list[runner.Outcome]:
    """The round's outcomes, each with the baseline interpolated to its place in the round.

    `outcomes` are in run order with the baseline among them; `closing` is the baseline run
    again after the last one (empty when there is no baseline, or it failed: then the
    opening run stands for the whole round).
    """
    opening = next((o for o in outcomes if o.scenario == BASELINE and o.result), None)
    if opening is None or opening.result is None:
        return outcomes
    end = closing[0] if closing and closing[0].result is not None else opening
    assert end.result is not None
    start_at = outcomes.index(opening)
    span = len(outcomes) - start_at  # the closing run comes one place after the last
    placed = []
    for i, outcome in enumerate(outcomes):
        w = max(0, i - start_at) / span
        rps = opening.result.rps + (end.result.rps - opening.result.rps) * w
        cpu = None
        if opening.cpu_us and end.cpu_us:
            cpu = opening.cpu_us + (end.cpu_us - opening.cpu_us) * w
        placed.append(dataclasses.replace(outcome, base=(rps, cpu)))
    return placed


def median_round(outcomes: list[runner.Outcome]) -> runner.Outcome:
    """The round with the median req/s, carrying every round's figures; a failed round fails."""
    failed = [o for o in outcomes if o.result is None]
    if failed:
        return failed[0]
    ranked = sorted(outcomes, key=lambda o: o.result.rps if o.result else 0.0)
    every = tuple(
        runner.Round(
            o.result.rps,
            o.cpu_us,
            o.base[0] if o.base else None,
            o.base[1] if o.base else None,
            o.backend_us,
        )
        for o in outcomes
        if o.result is not None
    )
    return dataclasses.replace(ranked[(len(ranked) - 1) // 2], rounds=every)


def publish(outcomes: list[runner.Outcome], run_meta: dict[str, Any]) -> int:
    """Print the table, the targets and any failures, write the JSON; return the exit status.

    Missed targets are reported only; the status is 1 when a scenario failed.
    """
    setup = str(run_meta.get("setup", "plain"))
    if "server" in run_meta:
        print(f"\n== server setup {setup}: {run_meta['server']}")
    print(
        f"generator: {run_meta['generator']}  cpus: {run_meta['cpu_pinning']}  "
        f"connections: {run_meta['connections']}  valkey malloc: "
        f"{run_meta.get('valkey_allocator', 'unknown')}  measured: {run_meta['duration_s']} s, "
        f"median of {run_meta.get('rounds', 1)} interleaved round(s); ratios and differences "
        "are medians of per-round ones"
    )
    print(report.table(outcomes))
    verdicts = targets.evaluate(outcomes, targets.GOALS_OF_SETUP.get(setup, targets.GOALS))
    section = report.targets_table(verdicts)
    if section:
        print("\n" + section)
    problems = report.failures(outcomes)
    if problems:
        print("\n" + problems)
    path = RESULTS if setup == "plain" else RESULTS.with_name(f"results-{setup}.json")
    report.write_json(path, outcomes, run_meta, verdicts)
    print(f"\nwritten {path}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios, print the table and write ``results.json``."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.generator == "wrk" and not wrk.available():
        cli.error("--generator wrk: wrk is not on PATH (Debian: apt-get install wrk)")
    plan = cpu.plan()
    cpu.pin_self(plan.others)
    generator = choose_generator(args.generator)
    status = 0
    for setup in args.setups:
        settings, outcomes = run_all(selected(args.only), generator, plan, args, setup)
        status = max(status, publish(outcomes, meta(settings, generator, plan, args.rounds)))
    return status
