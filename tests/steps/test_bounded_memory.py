"""Large bodies stream through: of a response only cache and idempotency records keep a
body, up to their `max_body` (what they do not keep is counted); a request body a step
would read whole is refused (413) past the default `max_body`, having read no more."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from policyroute.errors import Problems
from tests.observability.kit import sample
from tests.servers import Served, uvicorn

from .stateful import install, running

MIB = 1 << 20
STREAMED = 150 * MIB

POLICY = """\
version: 1
routes:
  GET /stream:
    public: true
    rate_limit: {key: ip, capacity: 100, per: 1m}
  GET /stream/cached:
    public: true
    cache: {ttl: 1m}
  POST /stream/once:
    public: true
    idempotency: {}
  POST /jobs:
    public: true
    request: {max_body: 1MiB}
"""


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def worker(policy_dir: Path, valkey_url: str) -> Iterator[Served]:
    """One uvicorn worker of the policy above."""
    (policy_dir / "routes.yaml").write_text(POLICY)
    with uvicorn(policy_dir, valkey_url) as served:
        yield served


async def _stream(c: httpx.AsyncClient, method: str, url: str, **kw: object) -> int:
    """Read a response to the end without keeping it; its size."""
    size = 0
    async with c.stream(method, url, **kw) as answer:  # type: ignore[arg-type]
        assert answer.status_code == 200
        async for chunk in answer.aiter_raw():
            size += len(chunk)
    return size


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/stream", {}),  # a rate limit keeps no body at all
        ("GET", "/stream/cached", {}),  # the cache keeps 1 MiB, then lets go
        ("POST", "/stream/once", {"Idempotency-Key": "big-1"}),  # so does the record
    ],
)
async def test_a_large_response_streams_through_without_growing_the_worker(
    worker: Served, method: str, path: str, headers: dict[str, str]
) -> None:
    query = f"?chunks={STREAMED // MIB}&size={MIB}"
    async with httpx.AsyncClient(base_url=worker.base, timeout=60) as c:
        # Warm up: the route's chain, its scripts and a 1 MiB response once.
        assert await _stream(c, method, path + "?chunks=1&size=" + str(MIB)) == MIB
        before = peak_rss(worker.proc.pid)
        size = await _stream(c, method, path + query, headers=headers)
        after = peak_rss(worker.proc.pid)
    assert size == STREAMED
    # The whole body used to be recorded (and copied once more): +300 MB for 150 MB.
    assert after - before < 30 * MIB, f"peak RSS grew {(after - before) / MIB:.0f} MiB"


SMALL = """\
version: 1
routes:
  GET /stream/cached:
    public: true
    cache: {ttl: 1m, max_body: 1KiB}
  POST /stream/once:
    public: true
    idempotency: {max_body: 1KiB}
"""


async def test_a_response_past_cache_max_body_is_not_stored_and_is_counted(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, SMALL, valkey_url, calls)
    route = {"route": "GET /stream/cached", "step": "cache"}
    counted = sample("policyroute_unkept_responses_total", **route)
    async with running(app) as c:
        big = [await c.get("/stream/cached?chunks=65") for _ in range(2)]  # 1040 bytes
        small = [await c.get("/stream/cached?chunks=64") for _ in range(2)]  # 1024 bytes
    assert [len(r.content) for r in big] == [1040, 1040]
    assert [r.headers.get("x-cache") for r in big] == [None, None]  # a miss each time
    assert [r.headers.get("x-cache") for r in small] == [None, "hit"]
    assert small[1].content == small[0].content
    assert calls["stream"] == 3
    assert sample("policyroute_unkept_responses_total", **route) - counted == 2


async def test_a_response_past_idempotency_max_body_is_never_run_twice(
    policy_dir: Path, valkey_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = install(policy_dir, SMALL, valkey_url, calls)
    route = {"route": "POST /stream/once", "step": "idempotency"}
    counted = sample("policyroute_unkept_responses_total", **route)
    async with running(app) as c:
        first = await c.post("/stream/once?chunks=65", headers={"Idempotency-Key": "k1"})
        again = await c.post("/stream/once?chunks=65", headers={"Idempotency-Key": "k1"})
        small = await c.post("/stream/once?chunks=64", headers={"Idempotency-Key": "k2"})
        replay = await c.post("/stream/once?chunks=64", headers={"Idempotency-Key": "k2"})
    assert (first.status_code, len(first.content)) == (200, 1040)
    # The record keeps the status alone: the repeat is refused, not run a second time.
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    body = again.json()
    assert body["type"] == Problems.IDEMPOTENCY_RESPONSE_NOT_KEPT.uri
    assert body["original_status"] == 200
    assert (replay.status_code, replay.content) == (200, small.content)
    assert replay.headers["idempotent-replayed"] == "true"
    assert calls["stream"] == 2
    assert sample("policyroute_unkept_responses_total", **route) - counted == 1


async def _post(served: Served, path: str, total: int, chunked: bool) -> tuple[int, int]:
    """POST `total` bytes in 1 MiB pieces, sending until the answer comes: (status, sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {total}"
    writer.write(
        f"POST {path} HTTP/1.1\r\nhost: t\r\nidempotency-key: big-2\r\n{framing}\r\n\r\n".encode()
    )
    sent = 0

    async def body() -> None:
        nonlocal sent
        piece = b"x" * MIB
        frame = b"%x\r\n%s\r\n" % (MIB, piece) if chunked else piece
        while sent < total:
            writer.write(frame)
            await writer.drain()
            sent += MIB
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    sending = asyncio.create_task(body())
    try:
        status = int((await asyncio.wait_for(reader.readline(), 60)).split()[1])
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        writer.close()
    return status, sent


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("path", ["/stream/once", "/jobs"])
async def test_a_large_request_body_is_refused_before_it_is_read_whole(
    worker: Served, path: str, chunked: bool
) -> None:
    async with httpx.AsyncClient(base_url=worker.base, timeout=60) as c:
        warm = await c.post(path, json={"n": 1}, headers={"Idempotency-Key": "warm"})
        assert warm.is_success
    before = peak_rss(worker.proc.pid)
    # The idempotency step fingerprints the body: it reads 1 MiB (the default) at most.
    # /jobs says 1 MiB itself, and its handler reads the body (FastAPI's request.json()).
    status, _ = await _post(worker, path, STREAMED, chunked)
    after = peak_rss(worker.proc.pid)
    assert status == 413
    assert after - before < 30 * MIB, f"peak RSS grew {(after - before) / MIB:.0f} MiB"
