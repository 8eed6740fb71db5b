"""Verification keys of one issuer: a JWKS file or https URL, cached, refreshed sparingly."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet

log = logging.getLogger("policyroute.auth")

MAX_JWKS_BYTES = 1024 * 1024
FETCH_TIMEOUT = 5.0
# A kid that could be a real key id; anything else never triggers a fetch.
_PLAUSIBLE_KID = re.compile(r"^[\x21-\x7e]{1,128}$")

Fetch = Callable[[str], bytes]


class _HttpsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https: a key set must never come over plain http."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if not newurl.startswith("https://"):
            raise OSError("a JWKS redirect left https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpsOnly)


def fetch_jwks(location: str) -> bytes:
    """The bytes of a JWKS from an https URL or a file (blocking; run it in a thread)."""
    if location.startswith("https://"):
        request = urllib.request.Request(location, headers={"Accept": "application/json"})  # noqa: S310 - https only
        with _OPENER.open(request, timeout=FETCH_TIMEOUT) as response:
            data: bytes = response.read(MAX_JWKS_BYTES + 1)
    else:
        with Path(location).open("rb") as file:
            data = file.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    return data


def parse_jwks(data: bytes) -> dict[str, Key]:
    """Public signature keys by kid; symmetric and encryption keys are dropped."""
    document = json.loads(data)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS is a JSON object with a `keys` list")
    wanted = [k for k in document["keys"]
              if isinstance(k, dict) and k.get("kty") != "oct" and k.get("use", "sig") == "sig"]
    if not wanted:
        raise ValueError("the JWKS has no public signature keys")
    keys = KeySet.import_key_set({"keys": wanted})
    return {str(key.kid): key for key in keys}


class KeySource:
    """The keys of one JWKS; an unknown kid refreshes them at most once per `refresh` seconds."""

    def __init__(self, location: str, refresh: float, fetch: Fetch = fetch_jwks,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.location = location
        self.refresh = refresh
        self.keys: dict[str, Key] = {}
        self._fetch = fetch
        self._clock = clock
        self._last_attempt = float("-inf")
        self._lock = asyncio.Lock()

    def load_now(self) -> None:
        """Load the keys at once (compile time, for files); raise ValueError when unusable."""
        self._last_attempt = self._clock()
        try:
            self.keys = parse_jwks(self._fetch(self.location))
        except (OSError, ValueError, JoseError) as exc:
            raise ValueError(f"cannot load the JWKS {self.location}: {exc}") from exc

    def find(self, kid: str | None) -> Key | None:
        """The key with this kid; a token without kid may use the only key."""
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)

    async def get(self, kid: str | None) -> Key | None:
        """The key for a token's kid, refreshing the set when allowed and it could help."""
        key = self.find(kid)
        # While a refresh is in flight, wait for it: its keys may be the ones this token needs.
        if key is None and (self._lock.locked() or self._may_refresh(kid)):
            await self._refresh()
            key = self.find(kid)
        return key

    def _may_refresh(self, kid: str | None) -> bool:
        if self._clock() - self._last_attempt < self.refresh:
            return False
        return bool(_PLAUSIBLE_KID.match(kid)) if kid is not None else not self.keys

    async def _refresh(self) -> None:
        async with self._lock:
            if self._clock() - self._last_attempt < self.refresh:
                return  # another request refreshed while this one waited
            self._last_attempt = self._clock()
            try:
                data = await asyncio.to_thread(self._fetch, self.location)
                self.keys = parse_jwks(data)
            except (OSError, ValueError, JoseError) as exc:
                # Keep the keys we had; the cause's type only (a body could echo anything).
                log.warning("policyroute: refreshing the JWKS %s failed (%s); keeping %d keys",
                            self.location, type(exc).__name__, len(self.keys))
