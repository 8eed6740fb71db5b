"""A client that hangs up mid-request, against a real uvicorn: refunds and slots follow the policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from policyroute.admin import credits
from policyroute.backends.valkey import ValkeyStore
from tests.servers import uvicorn

REPO = Path(__file__).resolve().parents[2]

POLICY = """\
version: 1
routes:
  GET /charge:
    public: true
    rate_limit: {algorithm: concurrency, key: ip, capacity: 1}
    credits: {cost: 1, refund_on: [5xx, timeout, error, disconnect]}
  POST /charge:
    public: true
    credits: {cost: 1}
  GET /stream:
    public: true
    credits: {cost: 1}
  GET /stream/refunded:
    public: true
    credits: {cost: 1, refund_on: [5xx, timeout, error, disconnect]}
"""
LINE = b"x" * 15 + b"\n"  # one line of tests/steps/stateful.py's /stream


@pytest.fixture
def server(policy_dir: Path, valkey_url: str) -> Iterator[tuple[str, int, str]]:
    """One uvicorn worker of the policy above: (host, port, key prefix)."""
    (policy_dir / "routes.yaml").write_text(POLICY)
    with uvicorn(policy_dir, valkey_url) as served:
        yield "127.0.0.1", served.port, served.prefix


async def _hang_up(host: str, port: int, request: bytes, store: ValkeyStore) -> None:
    """Send a request, wait until its credit is reserved, then close the connection."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    for _ in range(200):
        if (await credits.show(store, "127.0.0.1", ip=True)).held:
            break
        await asyncio.sleep(0.02)
    writer.close()
    await writer.wait_closed()
    del reader


async def _balance_settles(store: ValkeyStore, total: int) -> credits.Balance:
    found = await credits.show(store, "127.0.0.1", ip=True)
    for _ in range(100):
        if found.held == 0 and found.total == total:
            break
        await asyncio.sleep(0.05)
        found = await credits.show(store, "127.0.0.1", ip=True)
    return found


async def test_hang_up_refunds_when_the_policy_says_and_frees_the_slot(
    server: tuple[str, int, str], valkey_url: str
) -> None:
    host, port, prefix = server
    store = ValkeyStore(valkey_url, prefix=prefix)
    try:
        await credits.set_balance(store, "127.0.0.1", 10, ip=True)
        started = time.monotonic()
        await _hang_up(host, port, b"GET /charge?sleep=5 HTTP/1.1\r\nHost: t\r\n\r\n", store)
        # refund_on lists `disconnect`: the handler is stopped, nothing is charged ...
        balance = await _balance_settles(store, 10)
        assert (balance.total, balance.held) == (10, 0)
        # ... and the concurrency slot (capacity 1) is free again at once, not after 5 s.
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
            again = await c.get("/charge")
        assert again.status_code == 200
        assert time.monotonic() - started < 4
        assert (await credits.show(store, "127.0.0.1", ip=True)).total == 9
    finally:
        await store.stop()


async def test_hang_up_is_charged_when_the_policy_does_not_refund_it(
    server: tuple[str, int, str], valkey_url: str
) -> None:
    host, port, prefix = server
    store = ValkeyStore(valkey_url, prefix=prefix)
    try:
        await credits.set_balance(store, "127.0.0.1", 10, ip=True)
        body = b'{"x": 1}'
        request = (
            b"POST /charge?sleep=0.5 HTTP/1.1\r\nHost: t\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await _hang_up(host, port, request, store)
        # The default refund_on has no `disconnect`: the work was done, so it is charged.
        balance = await _balance_settles(store, 9)
        assert (balance.total, balance.held) == (9, 0)
    finally:
        await store.stop()


async def _read_part(host: str, port: int, path: bytes, lines: int) -> None:
    """Read the first `lines` lines of a streamed response, then close the connection."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
    await writer.drain()
    seen = b""
    while seen.count(LINE) < lines:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "the server ended the stream early"
        seen += data
    assert seen.count(LINE) == lines  # the rest had not been sent yet
    writer.close()
    await writer.wait_closed()


async def test_a_stream_read_in_part_is_charged_unless_refund_on_names_disconnect(
    server: tuple[str, int, str], valkey_url: str
) -> None:
    host, port, prefix = server
    store = ValkeyStore(valkey_url, prefix=prefix)
    try:
        await credits.set_balance(store, "127.0.0.1", 10, ip=True)
        # 19 of 20 lines, three times: the default refund_on has no `disconnect`, so each
        # stream the client walked away from is paid for.
        for _ in range(3):
            await _read_part(host, port, b"/stream?chunks=20&sleep=0.05", 19)
        balance = await _balance_settles(store, 7)
        assert (balance.total, balance.held) == (7, 0)
        # The same on a route whose refund_on names `disconnect`: refunded.
        await _read_part(host, port, b"/stream/refunded?chunks=20&sleep=0.05", 19)
        await asyncio.sleep(0.3)
        balance = await _balance_settles(store, 7)
        assert (balance.total, balance.held) == (7, 0)
        # A stream read to the end is charged on either route.
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as c:
            whole = await c.get("/stream/refunded?chunks=20")
        assert whole.content == LINE * 20
        balance = await _balance_settles(store, 6)
        assert (balance.total, balance.held) == (6, 0)
    finally:
        await store.stop()
