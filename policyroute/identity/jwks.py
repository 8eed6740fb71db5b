"""Verification keys of one issuer: a JWKS file or https URL, kept fresh in the background.

A URL is fetched on first use, then again when its `Cache-Control: max-age` runs out
(kept between the issuer's `jwks_refresh` bounds); a file is re-read when it changes.
A token naming an unknown kid may fetch sooner, at most once per `min`. A failed fetch
keeps the last good keys and is retried with backoff. Keys that leave the set are
handed to `on_removed`, so verifications made with them can be forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import math
import re
import time
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet

from ..errors import PolicyrouteError

log = logging.getLogger("policyroute.auth")

MAX_JWKS_BYTES = 1024 * 1024
FETCH_TIMEOUT = 5.0
# How often a JWKS file is looked at (one stat); it is read again only when it changed.
FILE_CHECK = 1.0
# A kid that could be a real key id; anything else never triggers a fetch.
_PLAUSIBLE_KID = re.compile(r"^[\x21-\x7e]{1,128}$")
_MAX_AGE = re.compile(r'^\s*max-age\s*=\s*"?(\d+)"?\s*$', re.IGNORECASE)
_NO_CACHE = re.compile(r"^\s*(no-cache|no-store)\s*(=.*)?$", re.IGNORECASE)
# What a fetch of a bad, unreachable or half-answering source raises.
_FETCH_ERRORS = (OSError, ValueError, JoseError, http.client.HTTPException)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A JWKS document and how many seconds its server says it stays fresh (None: unsaid)."""

    data: bytes
    max_age: float | None = None


Fetch = Callable[[str], bytes | Fetched]
OnRemoved = Callable[[Sequence[Key]], None]


class KeysUnavailableError(PolicyrouteError):
    """No key set of an issuer could be obtained yet: nothing can verify its tokens."""

    def __init__(self, location: str, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"the JWKS {location} could not be obtained")


class _HttpsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https: a key set must never come over plain http."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if not newurl.startswith("https://"):
            raise OSError("a JWKS redirect left https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpsOnly)


def freshness(cache_control: str | None, age: str | None = None) -> float | None:
    """Seconds a response stays fresh: `max-age` less `Age`; 0 for no-cache or no-store."""
    if not cache_control:
        return None
    max_age: float | None = None
    for directive in cache_control.split(","):
        if _NO_CACHE.match(directive):
            return 0.0
        found = _MAX_AGE.match(directive)
        if found and max_age is None:
            max_age = float(found.group(1))
    if max_age is None:
        return None
    spent = float(age.strip()) if age and age.strip().isdigit() else 0.0
    return max(0.0, max_age - spent)


def fetch_jwks(location: str) -> Fetched:
    """The bytes of a JWKS from an https URL or a file (blocking; run it in a thread)."""
    max_age = None
    if location.startswith("https://"):
        request = urllib.request.Request(location, headers={"Accept": "application/json"})  # noqa: S310 - https only
        with _OPENER.open(request, timeout=FETCH_TIMEOUT) as response:
            data: bytes = response.read(MAX_JWKS_BYTES + 1)
            cache_control = ", ".join(response.headers.get_all("Cache-Control") or ())
            max_age = freshness(cache_control, response.headers.get("Age"))
    else:
        with Path(location).open("rb") as file:
            data = file.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    return Fetched(data, max_age)


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


def _stamp(location: str) -> tuple[int, int, int] | None:
    """What tells that a file changed: inode, size and modification time (None: unreadable)."""
    try:
        st = Path(location).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


async def _keep_fresh(ref: weakref.ref[KeySource]) -> None:
    """Refresh a source whenever it is due, until it is stopped or garbage."""
    while True:
        source = ref()
        if source is None:
            return  # a reload replaced it: nothing verifies with it any more
        delay = source.due - source.clock()
        if delay > 0:
            del source  # sleep without keeping it alive
            await asyncio.sleep(min(delay, 60.0))
            continue
        try:
            await source.scheduled()
        except Exception:  # never end the schedule: say so, try again after `min`
            log.exception("policyroute: refreshing the JWKS %s failed", source.location)
            source.due = source.clock() + source.min_interval
        del source


class KeySource:
    """The keys of one JWKS, refreshed on a schedule between `min_interval` and `max_interval`."""

    def __init__(self, location: str, min_interval: float, max_interval: float | None = None,
                 fetch: Fetch = fetch_jwks, clock: Callable[[], float] = time.monotonic, *,
                 background: bool = True) -> None:
        self.location = location
        self.remote = location.startswith("https://")
        self.min_interval = min_interval
        self.max_interval = max(max_interval or min_interval, min_interval)
        self.keys: dict[str, Key] = {}
        self.loaded = False  # a key set was obtained at least once
        self.due = math.inf  # when the next scheduled refresh runs (clock time)
        self.clock = clock
        self.on_removed: OnRemoved | None = None
        self._fetch = fetch
        self._background = background
        self._last_attempt = float("-inf")
        self._failures = 0
        self._stamp: tuple[int, int, int] | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def load_now(self) -> None:
        """Load the keys at once (compile time, for files); raise ValueError when unusable."""
        self._last_attempt = self.clock()
        stamp = None if self.remote else _stamp(self.location)
        try:
            fetched = self._fetch(self.location)
            self._swap(parse_jwks(fetched.data if isinstance(fetched, Fetched) else fetched))
        except _FETCH_ERRORS as exc:
            raise ValueError(f"cannot load the JWKS {self.location}: {exc}") from exc
        self._stamp = stamp
        self.due = self.clock() + (self.max_interval if self.remote else FILE_CHECK)

    def find(self, kid: str | None) -> Key | None:
        """The key with this kid; a token without kid may use the only key."""
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)

    async def get(self, kid: str | None) -> Key | None:
        """The key for a token's kid, refreshing the set when allowed and it could help.

        Raise KeysUnavailableError when no key set was ever obtained and this kid could be in one.
        """
        if self._task is None:
            self.start()
        key = self.find(kid)
        # While a refresh is in flight, wait for it: its keys may be the ones this token needs.
        if key is None and (self._lock.locked() or self._may_refresh(kid)):
            await self._refresh()
            key = self.find(kid)
        if key is None and not self.loaded and (kid is None or _PLAUSIBLE_KID.match(kid)):
            wait = self._last_attempt + self._gap() - self.clock()
            raise KeysUnavailableError(self.location, max(1, math.ceil(wait)))
        return key

    def start(self) -> None:
        """Keep the set fresh in the background, on the running loop (no-op without one)."""
        if not self._background or (self.remote and self._last_attempt == float("-inf")):
            return  # a URL is first fetched by the first token that needs it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._task is None or self._task.done():
            self._task = loop.create_task(_keep_fresh(weakref.ref(self)),
                                          name=f"policyroute-jwks {self.location}")

    async def stop(self) -> None:
        """Stop the background refresh (the engine's shutdown)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _gap(self) -> float:
        """The shortest time between two fetches: `min`, or a backoff while fetches fail."""
        if self._failures == 0:
            return self.min_interval
        return min(self.min_interval, 2.0 ** min(self._failures - 1, 16))

    def _may_refresh(self, kid: str | None) -> bool:
        if self.clock() - self._last_attempt < self._gap():
            return False
        return bool(_PLAUSIBLE_KID.match(kid)) if kid is not None else not self.keys

    async def scheduled(self) -> None:
        """The background's turn: fetch a URL whose time is up, re-read a file that changed."""
        if self.remote:
            await self._refresh(scheduled=True)
            return
        async with self._lock:
            if self.clock() < self.due:
                return
            self.due = self.clock() + FILE_CHECK
            stamp = await asyncio.to_thread(_stamp, self.location)
            if stamp == self._stamp:
                return
            if stamp is None:
                log.warning("policyroute: the JWKS file %s cannot be read; keeping %d keys",
                            self.location, len(self.keys))
                self._stamp = None
                return
            self._stamp = stamp  # a broken file is tried again when it changes again
            await self._attempt()

    async def _refresh(self, *, scheduled: bool = False) -> None:
        async with self._lock:
            now = self.clock()
            if scheduled and now < self.due - 0.001:
                return  # a refresh for an unknown kid moved the schedule
            if not scheduled and now - self._last_attempt < self._gap():
                return  # another request refreshed while this one waited
            await self._attempt()
        self.start()

    async def _attempt(self) -> None:
        """Fetch and swap in the set; on failure keep the last good one (lock held)."""
        self._last_attempt = self.clock()
        try:
            fetched = await asyncio.to_thread(self._fetch, self.location)
            if not isinstance(fetched, Fetched):
                fetched = Fetched(fetched)
            keys = parse_jwks(fetched.data)
        except _FETCH_ERRORS as exc:
            self._failures += 1
            self.due = self.clock() + (self._gap() if self.remote else FILE_CHECK)
            # Keep the keys we had; the cause's type only (a body could echo anything).
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            log.log(level, "policyroute: refreshing the JWKS %s failed (%s); keeping %d keys",
                    self.location, type(exc).__name__, len(self.keys))
            return
        if self._failures:
            log.info("policyroute: the JWKS %s was fetched again after %d failures",
                     self.location, self._failures)
        self._failures = 0
        self._swap(keys)
        if self.remote:
            age = self.max_interval if fetched.max_age is None else fetched.max_age
            self.due = self.clock() + min(max(age, self.min_interval), self.max_interval)
        else:
            self.due = self.clock() + FILE_CHECK

    def _swap(self, fresh: dict[str, Key]) -> None:
        """Take a new set; unchanged keys stay the same objects, removed ones are reported."""
        old = self.keys
        merged: dict[str, Key] = {}
        for kid, key in fresh.items():
            before = old.get(kid)
            if before is not None and before.as_dict(private=False) == key.as_dict(private=False):
                key = before  # the same key: the verifications it made stay
            merged[kid] = key
        kept = {id(k) for k in merged.values()}
        removed = [k for k in old.values() if id(k) not in kept]
        self.keys = merged
        self.loaded = True
        if removed:
            log.info("policyroute: the JWKS %s no longer has the keys %s; tokens they signed "
                     "are refused from now on", self.location,
                     ", ".join(sorted(str(k.kid) for k in removed)))
            if self.on_removed is not None:
                self.on_removed(removed)
