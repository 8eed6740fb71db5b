"""The stateful chain on a real uvicorn, on asyncio's own event loop and on uvloop's."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from policyroute.admin import credits
from policyroute.backends.valkey import ValkeyStore
from tests.servers import uvicorn

POLICY = """\
version: 1
routes:
  GET /charge:
    public: true
    rate_limit: {key: ip, capacity: 5, per: 60s}
    credits: {cost: 1}
  GET /cached/{item}:
    public: true
    cache: {ttl: 60s}
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_limits_credits_and_cache_work_on_either_event_loop(
    loop: str, policy_dir: Path, valkey_url: str
) -> None:
    # uvloop is what `uvicorn[standard]` runs on; its transports are not asyncio's classes.
    (policy_dir / "routes.yaml").write_text(POLICY)
    with uvicorn(policy_dir, valkey_url, loop=loop) as served:
        store = ValkeyStore(valkey_url, prefix=served.prefix)
        try:
            await credits.set_balance(store, "127.0.0.1", 2, ip=True)
            async with httpx.AsyncClient(base_url=served.base) as c:
                charged = [await c.get("/charge") for _ in range(3)]
                first = await c.get("/cached/a")
                second = await c.get("/cached/a")
            assert [r.status_code for r in charged] == [200, 200, 402]
            assert charged[0].headers["ratelimit"].endswith(";r=4;t=12")
            balance = await credits.show(store, "127.0.0.1", ip=True)
            assert (balance.total, balance.held) == (0, 0)
            assert "x-cache" not in first.headers and second.headers["x-cache"] == "hit"
            assert second.content == first.content
        finally:
            await store.stop()
