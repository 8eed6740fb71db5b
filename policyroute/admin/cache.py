"""Response-cache maintenance: invalidate a route's entries, warm listed paths."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from starlette.types import ASGIApp, Message

from ..backends.keys import digest, route_id
from ..backends.valkey import ValkeyStore
from ..errors import StorageError


def entry_pattern(store: ValkeyStore, route: str, path: str | None = None) -> str:
    """The SCAN pattern of a route's entries (every caller, every variant), or one path's."""
    where = digest(path) if path is not None else "*"
    return f"{store.prefix}:*:ce:{route_id(route)}:{where}:*"


async def invalidate(store: ValkeyStore, route: str, path: str | None = None) -> int:
    """Drop the cached responses of `route` (e.g. `GET /items/{id}`), or only of `path`."""
    pattern = entry_pattern(store, route, path)
    removed = 0
    try:
        batch: list[Any] = []
        async for key in store.client.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                removed += await _unlink(store, batch)
                batch = []
        if batch:
            removed += await _unlink(store, batch)
    except (OSError, TimeoutError) as exc:
        raise StorageError("valkey", "cache invalidate", False, exc) from exc
    return removed


async def _unlink(store: ValkeyStore, keys: list[Any]) -> int:
    # One key per command: in a cluster the keys of a route live in many slots.
    total = 0
    for key in keys:
        total += int(await store.command("UNLINK", key, operation="cache invalidate"))
    return total


async def get(
    app: ASGIApp, path: str, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """Run one in-process GET through the app (and its policies); return status and body."""
    raw_path, _, query = path.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(int(m["status"]) for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


async def warm(
    app: Any, paths: Iterable[str], headers: Mapping[str, str] | None = None
) -> dict[str, int]:
    """GET each path through the app with its lifespan running; return each path's status."""
    results: dict[str, int] = {}
    async with app.router.lifespan_context(app):
        for path in paths:
            results[path], _ = await get(app, path, headers)
    return results
