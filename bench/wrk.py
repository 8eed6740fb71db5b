"""The ``wrk`` load generator and a parser for its ``--latency`` report."""

from __future__ import annotations

import re
import shutil
import subprocess

from bench.loadgen import LoadError, LoadResult, Target

UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)")
_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def available() -> bool:
    """Tell whether ``wrk`` is on the ``PATH``."""
    return shutil.which("wrk") is not None


def command(target: Target, seconds: int, threads: int) -> list[str]:
    """Return the ``wrk`` command line for one run."""
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
        done = subprocess.run(
            command(target, seconds, threads), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise LoadError(f"wrk exited with {done.returncode}: {done.stderr.strip()}")
        return parse(done.stdout)
