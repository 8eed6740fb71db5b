"""Two checkouts side by side over HTTP: `python -m bench.ab --against CHECKOUT`.

```sh
.venv/bin/python -m bench.ab --against ../base core,local,full          # 8 rounds of 2 s
.venv/bin/python -m bench.ab --against ../base --rounds 12 --seconds 3 full
```

A whole `make bench` run cannot show a change of a few µs a request: the machine's speed
drifts by 5-10 % from one minute to the next here, and two runs minutes apart differ by
more than the change. This starts every server at once, the scenarios of this checkout
and of the other one (its code and its compiled build, served from its folder) and
bare FastAPI, each one uvicorn worker of the production setup on the server CPU, then
sends them short wrk bursts one after the other, round after round. Every figure is a
median of per-round ones: req/s over bare's in the same round, the worker's CPU µs per
request (`/proc/<pid>/stat`), and that minus bare's in the same round.

Build the other checkout first (`python -m policyroute._build` or `--pgo` there): a
checkout whose build is stale runs from source, which its servers' warning would say.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench import cpu, server, wrk
from bench.apps import VALKEY_URL_ENV
from bench.backend import valkey as start_valkey
from bench.loadgen import Target
from bench.scenarios import Scenario, by_name

BASELINE = "bare"
CONNECTIONS = 32


@dataclass
class _Served:
    label: str
    scenario: Scenario
    running: server.Running
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (req/s, CPU µs/req)


def _burst(served: _Served, seconds: int) -> tuple[float, float] | None:
    """One wrk burst on a fresh query script: (req/s, CPU µs per request), or None."""
    target = Target(
        server.HOST, served.running.port, served.scenario.path, served.scenario.headers,
        CONNECTIONS, served.scenario.unique_query,
    )
    with wrk.script_file(target) as script:
        before = server.cpu_seconds(served.running.pid)
        out = subprocess.run(
            wrk.command(target, seconds, 1, script), capture_output=True, text=True, check=True
        ).stdout
        after = server.cpu_seconds(served.running.pid)
    requests = wrk.parse(out).requests
    if before is None or after is None or requests == 0:
        return None
    return requests / seconds, (after - before) / requests * 1e6


def _names(text: str) -> list[str]:
    return [n if n.startswith(("policyroute_", "bare")) else f"policyroute_{n}"
            for n in text.split(",") if n]


def main(argv: list[str] | None = None) -> int:
    """Serve the scenarios from both checkouts and bare, alternate bursts, print medians."""
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("scenarios", type=_names, help="comma-separated: core,local,full,...")
    p.add_argument("--against", type=Path, required=True, help="the other checkout")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=int, default=2)
    p.add_argument("--setup", choices=tuple(server.SETUPS), default="production")
    args = p.parse_args(argv)
    if not wrk.available():
        p.error("needs wrk (Debian: apt-get install wrk)")
    known = {s.name for s in by_name([BASELINE, *args.scenarios])}
    unknown = sorted(set(args.scenarios) - known)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(unknown)}")
    checkouts = [("here", server.ROOT), ("against", args.against.resolve())]
    plan = cpu.plan()
    cpu.pin_self(plan.others)
    with start_valkey() as backend, ExitStack() as stack:
        env = {VALKEY_URL_ENV: backend.url}
        served: list[_Served] = []
        for scenario in by_name([BASELINE, *args.scenarios]):
            for name, root in checkouts[: 1 if scenario.name == BASELINE else 2]:
                running = stack.enter_context(
                    server.serve(scenario, env, plan.server, args.setup, root)
                )
                served.append(_Served(f"{scenario.name}@{name}", scenario, running))
        for number in range(args.rounds + 1):  # round 0 warms every server up
            for one in served:
                measured = _burst(one, args.seconds)
                if number and measured is not None:
                    one.rounds.append(measured)
    bare = served[0].rounds
    print(f"{args.setup} setup, {args.rounds} rounds of {args.seconds} s, medians; "
          f"here = {server.ROOT}, against = {checkouts[1][1]}; valkey malloc: "
          f"{backend.allocator}")
    print(f"{'server':34} {'req/s':>8} {'vs bare':>8} {'cpu us/req':>11} {'over bare':>10}")
    for one in served:
        pairs = list(zip(one.rounds, bare, strict=False))
        if not pairs:
            print(f"{one.label:34} no measurement")
            continue
        rps = statistics.median(r for r, _ in one.rounds)
        ratio = statistics.median(r[0] / b[0] for r, b in pairs)
        cpu_us = statistics.median(c for _, c in one.rounds)
        over = statistics.median(r[1] - b[1] for r, b in pairs)
        print(f"{one.label:34} {rps:8.0f} {ratio:8.3f} {cpu_us:11.1f} {over:+10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
