"""`cache`: response cache on Valkey, per principal unless shared, with a stampede lock."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Final

from cachetools import Cache as LocalStore
from cachetools import FIFOCache, LFUCache, LRUCache

from .._types import format_duration, format_size
from ..backends.keys import PATH_MEMO_LONGEST, TagMemo, digest, path_digest, route_id
from ..backends.pipeline import wire
from ..backends.valkey import ValkeyStore
from ..compile.step import Context
from ..crypto import DataKeyError
from ..identity.claims import claim_value
from ..language.policy import Cache, RoutePolicy
from .parts import PLAIN, Outcome, Part, Request, Stored, Vault, principal_tag, sleep_ms

# How long the first miss may take to fill the entry before a waiter runs the handler too
# (unless the policy sets `lock`).
STAMPEDE_LOCK_MS = 10_000
HIT: Final = (b"x-cache", b"hit")
# Request headers that carry credentials a handler may answer by.
CREDENTIAL_HEADERS = ("authorization", "cookie", "x-api-key")
log = logging.getLogger("policyroute")


def cache_key(store: ValkeyStore, tag: str, route: str, path: str, vary: str) -> str:
    """The key of one cache entry: the stored response, or the stampede lock of its miss.

    One string either way (`E...` a response, `L<token>` the request computing it), so a
    lookup that misses takes the lock in the same command: `SET key L<token> NX GET PX`.
    """
    return entry_key(store, tag, route_id(route), path, digest(vary))


def entry_key(store: ValkeyStore, tag: str, rid: str, path: str, variant: str) -> str:
    """`cache_key` from the route's id and the variant's digest, as requests make it."""
    return entry_prefix(store, tag, rid, path) + variant


def entry_prefix(store: ValkeyStore, tag: str, rid: str, path: str) -> str:
    """An entry key up to its variant (what a caller's requests to one path repeat)."""
    return store.key(tag, "ce", rid, path_digest(path)) + ":"


def entry(code: int, headers: bytes, body: bytes) -> bytes:
    """A stored response as one string: `E<status> <header bytes>\n<headers><body>`."""
    return b"E%d %d\n" % (code, len(headers)) + headers + body


def entry_fields(value: Any) -> tuple[int, bytes, bytes]:
    """(status, header block, body) of a stored entry string."""
    raw = value.encode("latin-1") if isinstance(value, str) else bytes(value)
    line, _, rest = raw.partition(b"\n")
    code, size = line[1:].split(b" ")
    length = int(size)
    return int(code), rest[:length], rest[length:]


def _unset(tag: str) -> tuple[str, str]:
    """A caller's (path, entry prefix) before its first request."""
    return "", ""


class _Served:
    """The route a cache part serves: its id, its shared tag, and per caller the last path
    asked for with its `entry_prefix` (made again when the path changes: path parameters)."""

    __slots__ = ("prefixes", "route", "route_id", "shared_tag")

    def __init__(self, route: str) -> None:
        self.route = route
        self.route_id = route_id(route) if route else ""
        self.shared_tag = shared_tag(route) if route else ""
        self.prefixes: TagMemo[tuple[str, str]] = TagMemo(_unset)


def shared_tag(route: str) -> str:
    """The hash tag of a shared (not per-principal) entry of a route."""
    return "r:" + route_id(route)


class CacheStep(Part):
    """Answer from the stored response; store 2xx responses without Set-Cookie.

    A request carrying credentials the entry's key does not cover bypasses the cache: it
    is neither answered from it nor stored, since its response may be made for whoever
    the credentials name and the key would hand it to callers without them.
    """

    name = "cache"

    def __init__(self, store: ValkeyStore, spec: Cache, vault: Vault = PLAIN) -> None:
        self.store = store
        self.spec = spec
        self.vault = vault
        self.fail_open = spec.on_backend_error == "open"
        self.ttl_ms = max(1, round(spec.ttl * 1000))
        self.lock_ms = (
            round(spec.lock * 1000) if spec.lock else min(self.ttl_ms * 10, STAMPEDE_LOCK_MS)
        )
        # Sent with every lookup and store: spelled once (`wire`).
        self.lock_arg, self.ttl_arg = wire((self.lock_ms, self.ttl_ms))
        self.vary_headers = tuple(h.lower() for h in spec.vary_headers)
        self.vary_claims = tuple(claim_value(c) for c in spec.vary_claims)
        # The credential headers that make a request bypass the cache when present.
        self.credentials = (
            ()
            if spec.ignore_credentials
            else tuple(h for h in CREDENTIAL_HEADERS if h not in self.vary_headers)
        )
        self.raw_credentials = frozenset(h.encode("latin-1") for h in self.credentials)
        # Their lengths: most headers a request carries are passed over by length alone.
        self.credential_lengths = frozenset(len(h) for h in self.raw_credentials)
        # The variant is method and query alone (no header, no claim named): see `variant`.
        self.by_query_only = spec.vary_query and not self.vary_headers and not self.vary_claims
        # The route served (set at first use), with what its requests derive from it.
        self.served = _Served("")
        self.local: LocalStore[str, tuple[float, Stored]] | None = None
        self.local_ttl = 0.0
        if spec.local is not None:
            kind = {"lru": LRUCache, "lfu": LFUCache, "fifo": FIFOCache}[spec.local.eviction]
            self.local = kind(maxsize=spec.local.max_entries)
            self.local_ttl = min(spec.local.ttl or spec.ttl, spec.ttl)

    def describe(self) -> str:
        """TTL and what the key varies by."""
        by = ["path"] + (["query"] if self.spec.vary_query else []) + list(self.vary_headers)
        by += [f"claim {c}" for c in self.spec.vary_claims]
        who = "shared by all callers" if self.spec.shared else "per principal"
        local = self.spec.local
        first = (
            f", in-process first tier of {local.max_entries} ({local.eviction}, "
            f"ttl {format_duration(self.local_ttl)})"
            if local
            else ""
        )
        bypass = (
            f"; bypassed by requests with {', '.join(self.credentials)}"
            " (unless a verified bearer token)"
            if self.credentials
            else ""
        )
        return (
            f"ttl {format_duration(self.spec.ttl)}, {who}, varies by {', '.join(by)}{first}, "
            f"bodies up to {format_size(self.spec.max_body)} stored{bypass}"
        )

    def uncovered(self, ctx: Context) -> bool:
        """Whether the request carries a credential the entry's key does not cover.

        A bearer token the auth step verified is covered: the key is its account (or the
        policy acknowledged one copy for every caller). Headers named in `vary_headers`
        are in the key. Anything else may have shaped a response meant for its holder.
        """
        credentials = self.raw_credentials
        lengths = self.credential_lengths
        for raw_name, value in ctx.scope["headers"]:
            if len(raw_name) not in lengths:
                continue
            # Names come lower-case from ASGI servers: lower-cased here only when they are not.
            name = raw_name if raw_name.islower() else raw_name.lower()
            if name not in credentials or not value.strip():
                continue
            if name == b"authorization" and ctx.principal.authenticated:
                continue
            return True
        return False

    def _local_get(self, key: str) -> Stored | None:
        if self.local is None:
            return None
        found = self.local.get(key)
        if found is None:
            return None
        if found[0] < time.monotonic():
            self.local.pop(key, None)
            return None
        return found[1]

    def _local_put(self, key: str, stored: Stored) -> None:
        if self.local is not None:
            self.local[key] = (time.monotonic() + self.local_ttl, stored)

    def variant(self, ctx: Context) -> str:
        """`digest` of `vary(ctx)`; by method and query alone, read from the raw bytes."""
        if self.by_query_only:
            query: bytes = ctx.scope.get("query_string", b"")
            if query.isascii():  # what `vary` gives, encoded, without decoding it first
                return digest(ctx.method.encode() + b"\0" + query)
        return digest(self.vary(ctx))

    def vary(self, ctx: Context) -> str:
        """The request's variant: method, query, the named headers and the named claims."""
        parts = [ctx.method]
        if self.spec.vary_query:
            parts.append(ctx.scope.get("query_string", b"").decode("latin-1"))
        parts.extend(ctx.headers.get(h, "") for h in self.vary_headers)
        if self.vary_claims:
            # One JSON list, last: claim values (any JSON, NULs included) never run together.
            claims = ctx.principal.claims
            parts.append(json.dumps([read(claims) for read in self.vary_claims],
                                    separators=(",", ":"), sort_keys=True))
        return "\0".join(parts)

    def peek(self, req: Request) -> None:
        """Answer from the in-process first tier before any other part queues an op."""
        ctx = req.ctx
        if self.credentials and self.uncovered(ctx):
            req.data["ca_bypass"] = True
            ctx.decide("cache", "bypass")
            return
        route = ctx.route
        served = self.served
        if route is not served.route:  # a part serves one route (and its HEAD): once
            # One object replaced whole: a thread sharing the part sees one route's values.
            served = self.served = _Served(route)
        tag = served.shared_tag if self.spec.shared else principal_tag(ctx)
        # `cache_key`, with the variant digested from the raw query where it can be.
        path = ctx.scope.get("path", "")
        last = served.prefixes.get(tag)
        if last[0] != path or not last[1]:
            last = (path, entry_prefix(self.store, tag, served.route_id, path))
            # Replaced whole, never changed in place: a thread sharing the part reads a
            # path with its own prefix, whichever pair it sees. A long path is not kept:
            # callers by the thousand, each with a long path of its own, would hold it all.
            if len(path) <= PATH_MEMO_LONGEST:
                served.prefixes.put(tag, last)
        value = last[1] + self.variant(ctx)
        req.data["ca_key"] = value
        local = self._local_get(value)
        if local is not None:
            # First tier hit: no cache op, no credit reservation; limits still apply.
            req.data["answer"] = local
            req.data["answer_headers"] = [HIT]
            req.data["ca_local"] = True
            ctx.decide("cache", "local_hit")

    def prepare(self, req: Request) -> None:
        """Append the lookup op (and the stampede lock on a miss)."""
        if not req.data.get("ca_local") and not req.data.get("ca_bypass"):
            req.op((req.data["ca_key"],), ("ca", self.lock_arg, req.token))

    def settle(self, req: Request, reply: list[Any]) -> None:
        """A hit answers; a miss that lost the lock waits for the first one."""
        verdict = req.data["verdict"]
        if req.data.get("ca_local") or req.data.get("ca_bypass"):
            return
        if verdict == "hit":
            stored = self._open(req.data["ca_key"], reply[3][0])
            if stored is None:
                req.ctx.decide("cache", "miss")
                return  # an unreadable entry is a miss that stores nothing
            self._local_put(req.data["ca_key"], stored)
            req.data["answer"] = stored
            req.data["answer_headers"] = [HIT]
            req.ctx.decide("cache", "hit")
        elif verdict == "wait":
            req.data["wait"] = lambda: self.wait(req)
            req.ctx.decide("cache", "wait")
        elif verdict == "go":
            req.data["ca_leader"] = True
            req.ctx.decide("cache", "miss")

    async def wait(self, req: Request) -> Stored | None:
        """Poll until the leader stored the entry; None when it gave up (run the handler)."""
        value = req.data["ca_key"]
        deadline = time.monotonic() + self.lock_ms / 1000
        pause = 2.0
        while time.monotonic() < deadline:
            await sleep_ms(pause)
            pause = min(pause * 2, 50.0)
            found = await self.store.run(
                "cache_poll", [value], [], operation="cache wait", fail_open=self.fail_open
            )
            if found is None:
                return None  # the lock is gone with no entry: run the handler
            if found[:1] == b"E":
                stored = self._open(value, found)
                if stored is not None:
                    req.data["answer_headers"] = [HIT]
                return stored
        return None

    def _open(self, key: str, value: Any) -> Stored | None:
        try:
            return self.vault.unpack(key, *entry_fields(value))
        except DataKeyError as exc:
            log.error("policyroute: cached entry of a sealed route does not open: %s", exc)
            return None

    def keeps(self, req: Request) -> int | None:
        """Up to `max_body` bytes of the response of a GET that leads a miss; else none."""
        if req.data.get("ca_leader") and req.ctx.method == "GET":
            return self.spec.max_body
        return None

    def storable(self, outcome: Outcome) -> Stored | None:
        """The response if it may be cached: complete, kept, 2xx, no Set-Cookie, not no-store."""
        stored = outcome.complete
        if stored is None or not 200 <= stored.status < 300 or not outcome.handler_ran:
            return None
        if len(stored.body) > self.spec.max_body:
            return None
        for name, value in stored.headers:
            size = len(name)
            if size != 10 and size != 13:  # neither set-cookie nor cache-control
                continue
            low = name if name.islower() else name.lower()
            if low == b"set-cookie" or (
                low == b"cache-control" and value.lower().find(b"no-store") >= 0
            ):
                return None
        return stored

    def _too_large(self, outcome: Outcome) -> bool:
        """Whether a complete 2xx went unstored for its size alone."""
        if not outcome.done or not 200 <= outcome.status < 300 or not outcome.handler_ran:
            return False
        return outcome.dropped or len(outcome.body) > self.spec.max_body

    def after(self, req: Request, outcome: Outcome) -> None:
        """Store the response (and release the lock) when this request led the miss."""
        if not req.data.get("ca_leader"):
            return
        value = req.data["ca_key"]
        stored = self.storable(outcome) if req.ctx.method == "GET" else None
        if stored is None:
            if self._too_large(outcome):
                req.ctx.decide("unkept", "cache")
            req.finish("cau", [value], req.token)
            return
        self._local_put(value, stored)
        code, headers, body = self.vault.pack(stored, value)  # a native call, not `*` spread
        req.finish("cas", [value], entry(code, headers, body), self.ttl_arg)


def make_cache_part(policy: RoutePolicy, store: ValkeyStore, vault: Vault) -> Part | None:
    """The cache part of a route's fused state step."""
    return CacheStep(store, policy.cache, vault) if policy.cache else None
