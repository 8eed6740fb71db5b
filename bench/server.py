"""One uvicorn worker process serving a scenario's app."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import cpu
from bench.scenarios import Scenario

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.1
TAIL_LINES = 25


class ServerError(Exception):
    """The server did not start, did not answer 2xx, or died; carries its log tail."""

    def __init__(self, message: str, log_tail: str) -> None:
        """Keep the one-line reason and the last lines the server printed."""
        super().__init__(message)
        self.log_tail = log_tail


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# The two ways users serve: what a plain `pip install policyroute` runs (uvicorn without
# [standard]) and what production runs (uvicorn[standard], gunicorn's uvicorn workers).
# Both are named on the command line, so what happens to be installed changes nothing.
SETUPS: dict[str, tuple[str, str]] = {
    "plain": ("asyncio", "h11"),
    "production": ("uvloop", "httptools"),
}


def command(scenario: Scenario, port: int, setup: str = "plain", root: Path = ROOT) -> list[str]:
    """Return the uvicorn command line for ``scenario`` on ``port`` in server ``setup``,
    serving the checkout at ``root``."""
    loop, http = SETUPS[setup]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        scenario.app,
        f"--app-dir={root}",
        f"--host={HOST}",
        f"--port={port}",
        "--workers=1",
        f"--loop={loop}",
        f"--http={http}",
        "--no-access-log",
        "--log-level=warning",
    ]


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """Return the last ``lines`` lines of the file at ``path``."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def probe(scenario: Scenario, port: int) -> tuple[int, bytes]:
    """Send the scenario's request once and return the status and body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5.0)
    try:
        conn.request("GET", scenario.path, headers=dict(scenario.headers))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen[bytes], scenario: Scenario, port: int, log: Path) -> None:
    """Return once the server answers the scenario's request with a 2xx status."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"exited with code {proc.returncode} before answering", tail(log))
        try:
            status, body = probe(scenario, port)
        except (OSError, http.client.HTTPException):
            time.sleep(POLL_INTERVAL_S)
            continue
        if not 200 <= status < 300:
            raise ServerError(f"GET {scenario.path} answered {status}: {body[:200]!r}", tail(log))
        return
    raise ServerError(f"no answer within {STARTUP_TIMEOUT_S:.0f} s", tail(log))


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ask the server to shut down, and kill it if it does not in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a process has used so far (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Running:
    """A scenario's server that answers: its port and process id."""

    port: int
    pid: int


@contextmanager
def serve(
    scenario: Scenario,
    env: Mapping[str, str],
    cpus: frozenset[int],
    setup: str = "plain",
    root: Path = ROOT,
) -> Iterator[Running]:
    """Run the scenario's app in one uvicorn worker and yield it once it answers.

    ``root`` is the checkout served (its policyroute, its bench apps): another one than
    this bench's for `bench.ab`."""
    port = free_port()
    fd, name = tempfile.mkstemp(prefix=f"bench-{scenario.name}-", suffix=".log")
    log = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            proc = subprocess.Popen(
                command(scenario, port, setup, root),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env, **dict(scenario.env), "PYTHONPATH": str(root)},
                cwd=root,
                preexec_fn=cpu.pinner(cpus),
            )
        try:
            wait_ready(proc, scenario, port, log)
            yield Running(port, proc.pid)
            if proc.poll() is not None:
                raise ServerError(f"exited with code {proc.returncode} during the run", tail(log))
        finally:
            stop(proc)
    finally:
        log.unlink(missing_ok=True)
