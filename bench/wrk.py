"""The ``wrk`` load generator and a parser for its ``--latency`` report."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.loadgen import LoadError, LoadResult, Target, query_prefix, run_id

UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)")
_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")

# Each request's path is PREFIX .. thread .. "-" .. counter. setup() runs once per thread in
# the main Lua state and numbers the threads; each thread has its own state (so its own
# `count`). wrk.format with nil method, headers and body keeps the -H headers and GET.
UNIQUE_QUERY_LUA = """\
local prefix = %s
local threads = 0

function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

local count = 0

function request()
  count = count + 1
  return wrk.format(nil, prefix .. thread_id .. "-" .. count)
end
"""


def available() -> bool:
    """Tell whether ``wrk`` is on the ``PATH``."""
    return shutil.which("wrk") is not None


def lua_string(text: str) -> str:
    """Return ``text`` as a double-quoted Lua string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def unique_query_script(path: str, run: str) -> str:
    """Return the Lua script that gives every request of one run its own query."""
    return UNIQUE_QUERY_LUA % lua_string(query_prefix(path, run))


@contextlib.contextmanager
def script_file(target: Target) -> Iterator[Path | None]:
    """Yield a temporary Lua script for a unique-query target, else None."""
    if not target.unique_query:
        yield None
        return
    fd, name = tempfile.mkstemp(prefix="bench-wrk-", suffix=".lua")
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(unique_query_script(target.path, run_id()))
        yield path
    finally:
        path.unlink(missing_ok=True)


def command(target: Target, seconds: int, threads: int, script: Path | None = None) -> list[str]:
    """Return the ``wrk`` command line for one run, with ``-s script`` when given."""
    headers = [arg for name, value in target.headers for arg in ("-H", f"{name}: {value}")]
    return [
        "wrk",
        f"-t{threads}",
        f"-c{max(threads, target.connections)}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        *headers,
        *(("-s", str(script)) if script is not None else ()),
        target.url,
    ]


def _first(pattern: re.Pattern[str], text: str) -> re.Match[str]:
    match = pattern.search(text)
    if match is None:
        raise LoadError(f"wrk output has no match for {pattern.pattern!r}:\n{text}")
    return match


def _errors(text: str) -> int:
    non_2xx = _NON_2XX.search(text)
    socket = _SOCKET.search(text)
    count = int(non_2xx.group(1)) if non_2xx else 0
    return count + (sum(int(g) for g in socket.groups()) if socket else 0)


def parse(text: str) -> LoadResult:
    """Parse the report ``wrk --latency`` prints."""
    latencies = {m[1]: float(m[2]) * UNIT_MS[m[3]] for m in _PERCENTILE.finditer(text)}
    if set(latencies) != {"50", "99"}:
        raise LoadError(f"wrk output lacks the 50% and 99% latencies:\n{text}")
    total = _first(_TOTAL, text)
    return LoadResult(
        requests=int(total.group(1)),
        errors=_errors(text),
        seconds=float(total.group(2)) * UNIT_MS[total.group(3)] / 1000.0,
        rps=float(_first(_RPS, text).group(1)),
        p50_ms=latencies["50"],
        p99_ms=latencies["99"],
    )


class Wrk:
    """Drives a target with ``wrk``, an event-driven C load generator."""

    name = "wrk"

    def run(self, target: Target, seconds: int, threads: int) -> LoadResult:
        """Run ``wrk`` for ``seconds`` and parse its report."""
        with script_file(target) as script:
            done = subprocess.run(
                command(target, seconds, threads, script),
                capture_output=True,
                text=True,
                check=False,
            )
        if done.returncode != 0:
            raise LoadError(f"wrk exited with {done.returncode}: {done.stderr.strip()}")
        return parse(done.stdout)
