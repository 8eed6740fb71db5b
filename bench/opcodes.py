"""Python opcodes per request, by function: where a chain's interpreted work goes.

```sh
.venv/bin/python -m bench.opcodes local                  # the functions of one policy set
.venv/bin/python -m bench.opcodes bare local --top 40    # what local runs beyond bare
```

Serves the policy set in process (``bench.inproc``'s requests, one at a time, a real
Valkey, uvloop; every module from source, compiled or not), traces the measured requests
with ``sys.settrace`` and counts the opcodes each function executes, per request. With
two sets it prints the second's count minus the first's, function by function (largest
changes first): what a chain adds, and which of its functions add it. Opcodes are not
instructions (``bench.instructions`` counts those, and C work is not in opcodes), but
they name the Python function, which an instruction count of the interpreter cannot: on
this machine each opcode of the chain is about 50 instructions.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import subprocess
import sys
from types import FrameType
from typing import Any

from bench.apps import VALKEY_URL_ENV
from bench.backend import valkey as start_valkey
from bench.lua import _drive, _scopes
from policyroute._compiled import PURE_ENV

WARM = 300
COUNTED = 50

Counts = collections.Counter[str]


def _name(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages/", "/lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = os.path.relpath(path)
    return f"{path}:{code.co_firstlineno} {code.co_name}"


async def _traced(policy: str) -> Counts:
    from asgi_lifespan import LifespanManager

    os.environ["BENCH_POLICY"] = policy
    module = "bench.apps.bare" if policy == "bare" else "bench.apps.policyroute_app"
    sys.modules.pop(module, None)
    app: Any = importlib.import_module(module).app
    counts: Counts = collections.Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[_name(frame)] += 1
        return tracer

    async with LifespanManager(app):
        await _drive(app, _scopes("/ping", WARM, 0), 1)
        sys.settrace(tracer)
        try:
            ok = await _drive(app, _scopes("/ping", COUNTED, WARM), 1)
        finally:
            sys.settrace(None)
    if ok != COUNTED:
        raise RuntimeError(f"{policy}: not every request answered 2xx")
    return counts


def measure(policy: str) -> Counts:
    """Opcodes per function over COUNTED requests of `policy`.

    In a process of its own that runs every module from source (`POLICYROUTE_PURE=1`): the
    compiled modules execute no Python opcodes, so their work would not show.
    """
    done = subprocess.run(
        [sys.executable, "-m", "bench.opcodes", "--inside", policy],
        env={**os.environ, PURE_ENV: "1"}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Counts(json.loads(done.stdout))


def main(argv: list[str] | None = None) -> int:
    """Print opcodes per request by function for one policy set, or the change between two."""
    parser = argparse.ArgumentParser(prog="python -m bench.opcodes", description=__doc__)
    parser.add_argument("policies", nargs="+", help="one set, or two to compare")
    parser.add_argument("--top", type=int, default=30, help="functions to list (default 30)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # `measure`'s
    args = parser.parse_args(argv)
    if args.inside:
        import uvloop

        print(json.dumps(uvloop.run(_traced(args.policies[0]))))
        return 0
    if len(args.policies) > 2:
        parser.error("one policy set, or two to compare")
    with start_valkey() as backend:
        os.environ[VALKEY_URL_ENV] = backend.url
        runs = [measure(p) for p in args.policies]
    for policy, counts in zip(args.policies, runs, strict=True):
        print(f"{policy}: {sum(counts.values()) / COUNTED:,.0f} opcodes per request")
    if len(runs) == 1:
        for name, count in runs[0].most_common(args.top):
            print(f"{count / COUNTED:8,.1f}  {name}")
        return 0
    first, second = runs
    change = {k: (second[k] - first[k]) / COUNTED for k in first.keys() | second.keys()}
    for name in sorted(change, key=lambda k: -abs(change[k]))[: args.top]:
        if abs(change[name]) >= 0.5:
            print(f"{change[name]:+8,.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
