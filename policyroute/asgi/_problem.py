"""RFC 9457 problem+json responses at the ASGI level."""

from __future__ import annotations

import json

from starlette.types import Send

from ..errors import Denial

CONTENT_TYPE = b"application/problem+json"


def problem_bytes(denial: Denial, instance: str | None = None) -> bytes:
    """The encoded problem document of a denial."""
    return json.dumps(denial.body(instance), separators=(",", ":")).encode()


async def send_problem(
    send: Send, denial: Denial, *, instance: str | None = None, head: bool = False
) -> None:
    """Send a denial as a complete problem+json response."""
    body = problem_bytes(denial, instance)
    headers = [
        (b"content-type", CONTENT_TYPE),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    headers.extend(
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in denial.headers.items()
    )
    await send({"type": "http.response.start", "status": denial.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
