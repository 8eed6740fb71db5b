"""Real uvicorn worker processes of a test app, for tests that need a server of their own."""

from __future__ import annotations

import contextlib
import os
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
