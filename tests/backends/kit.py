"""What the backend tests share."""

from __future__ import annotations

from policyroute.backends.valkey import ValkeyStore


async def server_ms(store: ValkeyStore) -> int:
    """Valkey's own time now, in ms (`TIME`)."""
    seconds, micros = await store.command("TIME", operation="t")
    return int(seconds) * 1000 + int(micros) // 1000
