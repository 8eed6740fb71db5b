"""A process that dies mid-request: its credits, concurrency slot and idempotency record come back."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import policyroute
from policyroute.admin import credits
from tests.servers import uvicorn

from .stateful import make_app, running

REPO = Path(__file__).resolve().parents[2]

POLICY = """\
version: 1
routes:
  POST /jobs:
    public: true
    rate_limit: {algorithm: concurrency, key: ip, capacity: 1, lease: 1500ms}
    credits: {cost: 2, hold: 1500ms}
    idempotency: {lock: 1500ms}
"""


@pytest.fixture
def doomed_worker(
    policy_dir: Path, valkey_url: str
) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """One uvicorn worker of the policy above: (process, base URL, key prefix)."""
    (policy_dir / "routes.yaml").write_text(POLICY)
    with uvicorn(policy_dir, valkey_url) as served:
        yield served.proc, served.base, served.prefix


async def test_a_killed_worker_loses_no_credits_slot_or_key(
    policy_dir: Path, valkey_url: str, doomed_worker: tuple[subprocess.Popen[bytes], str, str]
) -> None:
    proc, base, prefix = doomed_worker
    app = make_app(Counter())
    settings = policyroute.Settings(valkey_url=valkey_url, key_prefix=prefix)
    policyroute.install(app, policy_dir, settings=settings)
    key = {"Idempotency-Key": "job-1"}
    async with running(app) as c:
        store = app.state.policyroute.services["valkey"]
        await credits.set_balance(store, "127.0.0.1", 10, ip=True)
        async with httpx.AsyncClient(base_url=base) as remote:
            doomed = asyncio.create_task(
                remote.post("/jobs?sleep=30", json={"n": 1}, headers=key, timeout=30)
            )
            for _ in range(500):
                if (await credits.show(store, "127.0.0.1", ip=True)).held == 2:
                    break
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGKILL)  # no finish script ever runs
            await asyncio.to_thread(proc.wait, 10)
            doomed.cancel()
            await asyncio.gather(doomed, return_exceptions=True)

        # The dead request still holds its slot, its key and its reservation.
        assert (await c.post("/jobs", json={"n": 2})).status_code == 429
        assert (await c.post("/jobs", json={"n": 1}, headers=key)).status_code in (409, 429)
        balance = await credits.show(store, "127.0.0.1", ip=True)
        assert (balance.total, balance.held) == (8, 2)

        await asyncio.sleep(1.6)  # every lease of the dead request has run out
        again = await c.post("/jobs", json={"n": 1}, headers=key)
        assert again.status_code == 201, again.text
        balance = await credits.show(store, "127.0.0.1", ip=True)
        # Refunded 2 on the first charge after the hold expired, then charged 2 again.
        assert (balance.total, balance.held) == (8, 0)
