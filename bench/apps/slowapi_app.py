"""The handler behind slowapi's ``Limiter``, counting in Valkey."""

from __future__ import annotations

from fastapi import FastAPI, Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address

from bench.apps import PING_BODY, valkey_url

LIMIT = "1000000/minute"


def storage_uri(url: str) -> str:
    """Return ``url`` with the ``valkey`` scheme.

    ``limits`` picks its client by scheme: ``redis://`` needs the ``redis``
    package, ``valkey://`` uses the ``valkey`` client that is installed here.
    """
    _, sep, rest = url.partition("://")
    return f"valkey://{rest}" if sep else url


limiter = Limiter(key_func=get_remote_address, storage_uri=storage_uri(valkey_url()))
app = FastAPI()
app.state.limiter = limiter
# slowapi types its handler for RateLimitExceeded only; Starlette asks for any Exception.
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]


@app.get("/ping")
@limiter.limit(LIMIT)
async def ping(request: Request) -> dict[str, bool]:
    """Answer the benchmark request."""
    return PING_BODY
