"""Small FastAPI apps, one per scenario, each serving the same ``GET /ping``."""

from __future__ import annotations

import os

VALKEY_URL_ENV = "POLICYROUTE_VALKEY_URL"
PING_BODY = {"ok": True}


def valkey_url() -> str:
    """Return the Valkey URL the harness passes in ``POLICYROUTE_VALKEY_URL``."""
    url = os.environ.get(VALKEY_URL_ENV)
    if not url:
        raise LookupError(f"{VALKEY_URL_ENV} is not set; run the app through `python -m bench`")
    return url
