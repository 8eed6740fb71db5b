"""Real uvicorn worker processes of a test app, for tests that need a server of their own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Served:
    """A running uvicorn: its process, base URL, port and the Valkey key prefix it uses."""

    proc: subprocess.Popen[bytes]
    base: str
    port: int
    prefix: str


@contextlib.contextmanager
def uvicorn(
    policy_dir: Path,
    valkey_url: str,
    *,
    app: str = "tests.steps.stateful:worker_app",
    workers: int = 1,
    cluster: bool = False,
    probe: str = "/nothing-here",
    factory: bool = True,
    env: dict[str, str] | None = None,
    loop: str = "auto",
) -> Iterator[Served]:
    """Start `app` (a factory) in `workers` processes with the policies of `policy_dir`.

    Waits until `probe` answers (any status); with several workers, until every process
    has answered when the app tags answers with `x-pid`, else briefly after the first.
    """
    port = free_port()
    prefix = "u" + uuid.uuid4().hex[:10]
    environ = {
        **os.environ,
        **(env or {}),
        "POLICYROUTE_POLICIES": str(policy_dir),
        "POLICYROUTE_VALKEY_URL": valkey_url,
        "POLICYROUTE_KEY_PREFIX": prefix,
        **({"POLICYROUTE_VALKEY_CLUSTER": "1"} if cluster else {}),
    }
    cmd = [sys.executable, "-m", "uvicorn", app, *(["--factory"] if factory else []),
           "--workers", str(workers), "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--no-proxy-headers", "--loop", loop]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=environ)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base + probe, workers)
        yield Served(proc, base, port, prefix)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, workers: int) -> None:
    deadline = time.monotonic() + 30
    pids: set[str] = set()
    tagged = True
    while True:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"uvicorn did not start ({len(pids)} of {workers} answered)")
        try:
            answer = httpx.get(url, timeout=0.5)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        pid = answer.headers.get("x-pid")
        tagged = pid is not None
        if pid is not None:
            pids.add(pid)
        if workers == 1 or (tagged and len(pids) >= workers):
            return
        if not tagged:
            time.sleep(0.5)  # untagged app: give the other workers time to start
            return


@dataclass(frozen=True)
class Run:
    """A running `policyroute run`: its process, base URL and the file of its output."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path


@contextlib.contextmanager
def policyroute_run(
    folder: Path,
    target: str,
    policies: Path,
    valkey_url: str,
    pulsar_url: str,
    env: dict[str, str] | None = None,
    probe: str = "/",
) -> Iterator[Run]:
    """`policyroute run TARGET` from `folder` (this checkout's package), until it answers.

    Stopped with SIGINT on exit (killed after 20 s); stdout and stderr go to one log file.
    """
    port = free_port()
    environ = {
        **os.environ,
        "POLICYROUTE_VALKEY_URL": valkey_url,
        "POLICYROUTE_PULSAR_URL": pulsar_url,
        "POLICYROUTE_POLICIES": str(policies),
        "POLICYROUTE_KEY_PREFIX": "t" + uuid.uuid4().hex[:10],
        # This checkout's policyroute, whatever the environment has installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    environ.pop("POLICYROUTE_RELOAD", None)
    log = folder / "policyroute-run.log"
    command = [sys.executable, "-m", "policyroute.cli", "run", target, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=folder, env=environ, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(base + probe, timeout=1.0)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.05)
        yield Run(proc, base, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
