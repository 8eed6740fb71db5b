"""What the bench routes run: their steps and their Valkey calls per request, checked.

``python -m bench.calls`` (also run by ``make bench``) serves each ``bench/policies/<set>``
in process against a real Valkey, as ``bench.lua`` does (one request at a time, so no
call is shared with another request's), and prints the route's compiled
steps (the parts of the state step too) and the script calls per request (``INFO
commandstats``). Both are compared with what they were before the brute-force lockout,
one-time tokens, throttle and debounce existed (``BEFORE``): none of the bench routes uses
them, so they must pay nothing for them, no step and no Valkey call. The exit status is 1
when one differs. It takes a few seconds: it counts, it does not time.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from typing import Any

from bench import lua
from bench.apps import VALKEY_URL_ENV
from bench.backend import valkey as start_valkey

REQUESTS = 200

# Per policy set: the steps of `GET /ping` and its script calls per request, as they were
# before the lockout, replay, throttle and debounce (main at 3c75f95). Requests are sent
# one at a time, so no call is shared with another request's (`Pipeline.share`, `join`):
# the counts are exact.
BEFORE: dict[str, tuple[tuple[str, ...], float]] = {
    "core": ((), 0.0),
    "limit": (("client:ClientStep", "state:StateStep", "rate_limit:RateLimitStep"), 1.0),
    "local": (
        (
            "client:ClientStep",
            "ip_allowlist:IpAllowlistStep",
            "auth:AuthStep",
            "scopes:ScopesStep",
            "roles:RolesStep",
        ),
        0.0,
    ),
    "full": (
        (
            "client:ClientStep",
            "ip_allowlist:IpAllowlistStep",
            "auth:AuthStep",
            "scopes:ScopesStep",
            "roles:RolesStep",
            "state:StateStep",
            "rate_limit:RateLimitStep",
            "credits:CreditsStep",
            "cache:CacheStep",
        ),
        2.0,
    ),
}


def steps(engine: Any) -> tuple[str, ...]:
    """The compiled steps of the bench route, state parts included, as name:class."""
    [chain] = [c for c in engine.chains() if c.route == "GET /ping"]
    found = []
    for step in chain.steps:
        found.append(f"{step.name}:{type(step).__name__}")
        found.extend(f"{p.name}:{type(p).__name__}" for p in getattr(step, "parts", ()))
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    """Print each bench route's steps and script calls; 1 when one changed."""
    names = argv if argv else list(BEFORE)
    failed = 0
    print("\npays nothing (bench routes use no lockout, replay, throttle or debounce):")
    saved = {name: os.environ.get(name) for name in ("BENCH_POLICY", VALKEY_URL_ENV)}
    try:
        with start_valkey() as backend:
            os.environ[VALKEY_URL_ENV] = backend.url
            for name in names:
                backend.flush()
                usage = asyncio.run(lua.measure(name, backend, REQUESTS, 1, tasks=1))[0]
                os.environ["BENCH_POLICY"] = name
                sys.modules.pop(lua.APP_MODULE, None)
                found = steps(importlib.import_module(lua.APP_MODULE).engine)
                sys.modules.pop(lua.APP_MODULE, None)
                calls = usage.scripts_per_request
                want_steps, want_calls = BEFORE.get(name, (found, calls))
                ok = found == want_steps and calls <= want_calls + 0.01
                failed += not ok
                shown = ", ".join(s.split(":")[0] for s in found) or "(none)"
                print(
                    f"  {'PASS' if ok else 'MISS'} {name}: {calls:.2f} script calls per request "
                    f"(before: at most {want_calls:.2f}); steps {shown}"
                    + ("" if found == want_steps else f" (before: {', '.join(want_steps)})")
                )
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
