"""`rate_limit`: token buckets, sliding windows, concurrency caps, throttles and debounces.

All on Valkey time, in the state step's one round trip (`lua/state.lua`), all or nothing:

- `throttle` (capacity per `per`, `burst`, `delay`, `max_delay`) smooths a burst instead of
  refusing it, as nginx's `limit_req`: requests leave one interval (`per / capacity`)
  apart, each told by the script how long to wait for its turn; it waits in this process
  (no connection, no Valkey call while it waits) and then goes on. More than `burst`
  waiting, or a wait longer than `max_delay`, is a 429 with Retry-After. The first `delay`
  of a queue go at once. A request that waits and is then cancelled keeps its place.
- `debounce` (`per`: the quiet window) acts on a repeat: the same request (method, path,
  query, body) from the same key while the previous one is less than `per` ago. Every
  repeat restarts the window. `on_repeat: refuse` answers it 429 with Retry-After `per`;
  `on_repeat: join` answers it with the response of the first request of the burst (once
  that one has it: the repeat waits, up to `lease`), so the handler runs once per burst.
  A joined request takes the route's other limits but no credits, idempotency record or
  cache lock. A first request that ends without a response to share (refused after the
  limits, failed before answering, a response with Set-Cookie or over `JOIN_MAX_BODY`)
  ends the window, and the repeats waiting on it are answered 429 with Retry-After 1.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from .._types import format_duration
from ..asgi.body import Header, read_body
from ..backends.keys import TagMemo, digest, route_id
from ..backends.pipeline import wire
from ..backends.valkey import Arg, ValkeyStore
from ..compile.step import Context
from ..crypto import DataKeyError
from ..errors import Denial, Problems, StorageError
from ..language.policy import RateLimit, RoutePolicy
from ..observability.metrics import THROTTLE_WAIT, backend_error
from ..observability.repeats import backend_warning
from ..observability.shadow import shadow_denial
from .parts import (
    PAUSES,
    PLAIN,
    Outcome,
    Part,
    Request,
    Stored,
    Vault,
    client_tag,
    principal_tag,
    sleep_ms,
)
from .slots import reply_text, run_state, state_reply

# How long a concurrency slot outlives a process that died holding it (unless `lease`).
CONCURRENCY_LEASE_MS = 300_000
# How long a debounce's first request may run (its repeats waiting to join) unless `lease`.
DEBOUNCE_LEASE_MS = 30_000
# The largest response a debounce's first request shares with the repeats that join it.
JOIN_MAX_BODY = 1 << 20
JOINED: Header = (b"x-debounce", b"joined")
# Ops that carry the request's token last (they hold something the request owns).
_OWNED: Final = ("cc", "db")

TagOf = Callable[[Context], str]


def client_chosen(key: str) -> bool:
    """Whether a limit key is a value the client sends unverified (`api_key`, `header:`).

    Such a limit counts in whatever bucket the request names: a new value each time is a
    new bucket, another caller's value spends theirs (lint: `client-chosen-key`).
    """
    return key == "api_key" or key.startswith("header:")


def _tag_of(key: str) -> TagOf:
    """The hash tag of a limit key, chosen once when compiling."""
    if key == "user":
        return principal_tag
    if key == "ip":
        return client_tag
    if key == "route":
        return lambda ctx: "r:" + route_id(ctx.route)
    if key == "api_key":
        return _from_header("x-api-key", "k:")
    if key.startswith("header:"):
        name = key.partition(":")[2].lower()
        return _from_header(name, f"h:{name}:")
    claim = key.partition(":")[2]

    def from_claim(ctx: Context) -> str:
        value = ctx.principal.claims.get(claim)
        # A caller without the claim shares the bucket of its address, never a free pass.
        return f"c:{claim}:{digest(str(value))}" if value is not None else client_tag(ctx)

    return from_claim


def _from_header(name: str, prefix: str) -> TagOf:
    def tag(ctx: Context) -> str:
        value = ctx.headers.get(name)
        return prefix + digest(value) if value else client_tag(ctx)

    return tag


def _sf_name(text: str) -> str:
    """A structured-field string for a policy name."""
    return '"' + re.sub(r'[^ -~]|["\\]', "_", text) + '"'


@dataclass(frozen=True, slots=True)
class Limit:
    """One compiled limit: its op, its key template and its header parameters."""

    spec: RateLimit
    name: str
    tag: TagOf
    index: str
    op: tuple[Arg, ...]
    policy_item: str
    label: str  # the name as a structured-field string
    # The key space of its state: a token bucket is one string "tokens at" (`tb`), the
    # others their own structures (`rl`); shadowed limits count in `<space>s`.
    space: str = "rl"

    def item(self, remaining: int, reset_ms: int) -> str:
        """This limit's `RateLimit` header item (draft-ietf-httpapi-ratelimit-headers)."""
        t = max(0, -(-reset_ms // 1000))
        return f"{self.label};r={max(0, remaining)};t={t}"


_DEFAULT_NAMES = {"concurrency": "concurrency", "throttle": "throttle", "debounce": "debounce"}


def limit_name(spec: RateLimit) -> str:
    """A limit's name: its own, else its algorithm's (concurrency, throttle...) or its key."""
    return spec.name or _DEFAULT_NAMES.get(spec.algorithm, spec.key)


def compile_limit(spec: RateLimit, index: int, names: set[str]) -> Limit:
    """Everything about one limit that does not depend on the request."""
    name = limit_name(spec)
    if name in names:
        name = f"{name}-{index}"
    names.add(name)
    capacity = spec.capacity or 1
    per_ms = max(1, round((spec.per or 0) * 1000))
    window = math.ceil(per_ms / 1000)
    if spec.algorithm == "concurrency":
        lease = round(spec.lease * 1000) if spec.lease else CONCURRENCY_LEASE_MS
        op: tuple[Arg, ...] = ("cc", capacity, lease)
        item = f"{_sf_name(name)};q={capacity}"
    elif spec.algorithm == "debounce":
        join = spec.on_repeat == "join"
        lease = round(spec.lease * 1000) if spec.lease else DEBOUNCE_LEASE_MS
        op = ("db", per_ms, "1" if join else "0", lease)
        item = f"{_sf_name(name)};q=1;w={window}"
    elif spec.algorithm == "throttle":
        maxwait = round(spec.max_delay * 1000) if spec.max_delay else -1
        op = ("th", per_ms / capacity, spec.burst or 0, spec.delay or 0, maxwait, spec.cost)
        item = f"{_sf_name(name)};q={capacity};w={window}"
    else:
        if spec.algorithm == "token_bucket":
            refill = spec.refill or capacity
            op = ("tb", capacity, refill, per_ms, spec.cost)
            # The window in which an empty bucket fills again.
            window = math.ceil(capacity * per_ms / refill / 1000)
        else:
            op = ("sw", capacity, per_ms, spec.cost)
        item = f"{_sf_name(name)};q={capacity};w={window}"
    space = "tb" if op[0] == "tb" else "rl"
    return Limit(spec, name, _tag_of(spec.key), str(index), wire(op), item, _sf_name(name), space)


def throttle_bound(spec: RateLimit) -> float:
    """The longest a throttle makes a request wait, in seconds (its queue, or max_delay)."""
    interval = (spec.per or 0) / (spec.capacity or 1)
    queued = max(0, (spec.burst or 0) - (spec.delay or 0)) * interval
    return min(queued, spec.max_delay) if spec.max_delay else queued


class RateLimitStep(Part):
    """Refuse with 429 when any limit of the route is exhausted; add RateLimit headers."""

    name = "rate_limit"

    def __init__(
        self,
        store: ValkeyStore,
        limits: list[RateLimit],
        *,
        enforce: bool = True,
        vault: Vault = PLAIN,
    ) -> None:
        self.store = store
        self.vault = vault
        names: set[str] = set()
        compiled = [compile_limit(s, i, names) for i, s in enumerate(limits)]
        self.compiled = tuple(compiled)
        self.limits = tuple(lim for lim in compiled if enforce and lim.spec.enforce)
        # Shadow mode: evaluated in buckets of their own, never refusing (observability/shadow.py).
        self.shadows = tuple(lim for lim in compiled if not (enforce and lim.spec.enforce))
        self.fail_open = all(lim.spec.on_backend_error == "open" for lim in self.limits)
        self.policy_header: Header = (
            b"ratelimit-policy",
            ", ".join(lim.policy_item for lim in self.limits).encode(),
        )
        # The route the limits' key memos were made for, and the memos (`_remake`).
        self.memos: tuple[str, tuple[TagMemo[str] | None, ...]] = ("", ())
        self.slots = tuple(i for i, lim in enumerate(self.limits) if lim.op[0] == "cc")
        self.shadow_slots = tuple(i for i, lim in enumerate(self.shadows) if lim.op[0] == "cc")
        self.watch_disconnect = bool(self.slots)  # a slot is freed when the client leaves
        # A debounce keys its record by the request itself, body included.
        self.needs_io = any(lim.op[0] == "db" for lim in compiled)
        # Whether an admitted request may wait (throttle) or join (debounce) first.
        self.special = any(lim.op[0] in ("th", "db") for lim in self.limits)
        self.joins = next(
            (lim for lim in self.limits if lim.op[0] == "db" and lim.op[2] == "1"), None
        )
        self.may_keep = self.joins is not None  # only a joining debounce keeps a response
        # One enforced limit that neither waits nor joins, none shadowed: the common route,
        # settled without the general loop (`settle`).
        self.single = (
            self.limits[0] if len(self.limits) == 1 and not self.shadows and not self.special
            else None
        )

    def describe(self) -> str:
        """The limits in one line."""
        out = []
        for lim in self.compiled:
            s = lim.spec
            per = s.key + (" (chosen by the client)" if client_chosen(s.key) else "")
            if s.algorithm == "concurrency":
                out.append(f"{lim.name}: at most {s.capacity} in flight per {per}")
            elif s.algorithm == "throttle":
                at_once = f" ({s.delay} of them at once)" if s.delay else ""
                out.append(
                    f"{lim.name}: throttle to {s.capacity} per {format_duration(s.per or 0)} per "
                    f"{per}, {s.burst} may wait{at_once}, none longer than "
                    f"{format_duration(throttle_bound(s))}; past that 429"
                )
            elif s.algorithm == "debounce":
                how = "joins its first's response" if s.on_repeat == "join" else "is refused"
                out.append(
                    f"{lim.name}: debounce per {per} and request: a repeat within "
                    f"{format_duration(s.per or 0)} of the last {how}"
                )
            elif s.algorithm == "token_bucket":
                out.append(
                    f"{lim.name}: token bucket of {s.capacity} per {per}, "
                    f"+{s.refill or s.capacity} per {format_duration(s.per or 0)}, cost {s.cost}"
                )
            else:
                out.append(
                    f"{lim.name}: {s.capacity} per {format_duration(s.per or 0)} sliding window "
                    f"per {per}"
                )
            if lim in self.shadows:
                out[-1] += " (shadow: enforce false)"
        return "; ".join(out)

    async def prepare_io(self, req: Request) -> None:
        """A debounce's request identity (method, path, query, body digest), then `prepare`."""
        ctx = req.ctx
        body = await read_body(ctx)
        head = (ctx.method, ctx.scope.get("path", ""), ctx.scope.get("query_string", b""))
        raw = b"\0".join(p if isinstance(p, bytes) else p.encode() for p in head)
        req.data["db_request"] = digest(self.vault.fingerprint(raw + b"\0" + body))
        self.prepare(req)

    def _key(self, req: Request, lim: Limit, shadow: bool, rid: str) -> str:
        space = lim.space + "s" if shadow else lim.space
        key = self.store.key(lim.tag(req.ctx), space, rid, lim.index)
        return f"{key}:{req.data['db_request']}" if lim.op[0] == "db" else key

    def _remake(self, route: str) -> tuple[TagMemo[str] | None, ...]:
        """The key memos of the limits for `route` (a debounce's key is the request's own)."""
        rid = route_id(route)
        key_of = self.store.key

        def memo(lim: Limit) -> TagMemo[str] | None:
            if lim.op[0] == "db":
                return None
            return TagMemo(lambda tag: key_of(tag, lim.space, rid, lim.index))

        # One tuple replaced whole: a thread sharing the part sees one route's memos.
        self.memos = (route, tuple(memo(lim) for lim in self.limits))
        return self.memos[1]

    def prepare(self, req: Request) -> None:
        """Append one op per limit (shadowed limits: a probe beside the script)."""
        ctx = req.ctx
        route = ctx.route
        if self.shadows:
            self._probe(req, route_id(route))
        limits = self.limits
        if not limits:
            return
        # A part serves one route (and its HEAD): its memos are made once.
        made = self.memos
        memos = made[1] if made[0] is route else self._remake(route)
        keys = []
        for i in range(len(limits)):
            lim = limits[i]
            memo = memos[i]
            # `_key`, from the memo for the limits that are not a debounce (most).
            key = self._key(req, lim, False, route_id(route)) if memo is None else memo.get(
                lim.tag(ctx)
            )
            keys.append(key)
            req.op((key,), (*lim.op, req.token) if lim.op[0] in _OWNED else lim.op)
        req.data["rl_keys"] = keys

    def _probe(self, req: Request, rid: str) -> None:
        """Evaluate the shadowed limits in their own buckets (`rls`), as enforcement would.

        A shadowed debounce that would join is evaluated as one that refuses (a repeat is
        a repeat); it stores no response.
        """
        store, ctx = self.store, req.ctx
        sub = Request(ctx, token=req.token)
        keys = [self._key(req, lim, True, rid) for lim in self.shadows]
        for key, lim in zip(keys, self.shadows, strict=True):
            op = lim.op if lim.op[0] != "db" else (*lim.op[:2], "0", *lim.op[3:])
            sub.op((key,), (*op, req.token) if lim.op[0] in _OWNED else op)
        req.data["rls_keys"] = keys

        async def evaluate() -> None:
            try:
                reply = state_reply(await run_state(store, sub, "rate_limit (shadow)", True))
            except StorageError as exc:
                backend_error(ctx.route, exc)
                backend_warning(ctx.route, exc)
                return
            req.absorb(sub)  # on a cluster: tokens to give back when another tag refused
            req.data["rls_rows"] = reply[1]

        req.probe(evaluate)

    def _settle_shadow(self, req: Request) -> None:
        rows = req.data.get("rls_rows")
        if rows is None:
            return  # the probe failed: nothing is known
        refused: Limit | None = None
        delayed = False
        for lim, row in zip(self.shadows, rows, strict=True):
            if not int(row[0]):
                refused = refused or lim
            elif len(row) > 5 and float(row[5]) > 0:
                delayed = True
        ctx = req.ctx
        if refused is None:
            req.data["rls_held"] = True
            ctx.decide("rate_limit", "shadow_delayed" if delayed else "shadow_allowed")
            return
        if refused.op[0] == "db" and refused.op[2] == "1":
            ctx.decide("rate_limit", "shadow_joined")  # a would-be join refuses nothing
            return
        ctx.decide("rate_limit", "shadow_limited")
        concurrency = refused.spec.algorithm == "concurrency"
        problem = Problems.CONCURRENCY_LIMITED if concurrency else Problems.RATE_LIMITED
        shadow_denial(ctx, "rate_limit", Denial(problem, f"limit {refused.name!r} is exhausted"))

    def settle(self, req: Request, reply: list[Any]) -> None:
        """Set the RateLimit headers; raise 429 when a limit refused; queue a wait or a join."""
        single = self.single
        if single is not None:
            row = reply[1][0]
            if row[0] == "1":  # allowed: the headers, one count
                extra = req.extra
                extra.append(self.policy_header)
                extra.append((b"ratelimit", single.item(int(row[1]), int(row[2])).encode()))
                req.data["rl_held"] = True
                req.ctx.decide("rate_limit", "allowed")
                return
        if self.shadows:
            self._settle_shadow(req)
        if not self.limits:
            return
        rows = reply[1]
        items = []
        retry_ms = 0
        refused: Limit | None = None
        limits = self.limits
        if len(rows) != len(limits):  # what `zip(strict=True)` checks, natively compiled
            raise ValueError(f"{len(rows)} rows for {len(limits)} limits")
        for i, lim in enumerate(limits):
            row = rows[i]
            remaining, reset_ms = int(row[1]), int(row[2])
            if row[0] == "1":
                items.append(lim.item(remaining, reset_ms))
                continue
            retry = int(row[3])
            items.append(lim.item(remaining, max(reset_ms, retry)))
            retry_ms = max(retry_ms, retry)
            refused = refused or lim
        extra = req.extra
        extra.append(self.policy_header)
        extra.append((b"ratelimit", (items[0] if len(items) == 1 else ", ".join(items)).encode()))
        ctx = req.ctx
        if refused is None:
            req.data["rl_held"] = True
            if self.special:
                self._admitted(req, rows, reply)
            else:
                ctx.decide("rate_limit", "allowed")
            return
        ctx.decide("rate_limit", "limited")
        retry_s = str(max(1, math.ceil(retry_ms / 1000)))
        headers = {k.decode(): v.decode() for k, v in req.extra}
        headers["Retry-After"] = retry_s
        concurrency = refused.spec.algorithm == "concurrency"
        problem = Problems.CONCURRENCY_LIMITED if concurrency else Problems.RATE_LIMITED
        if refused.spec.algorithm == "debounce":
            detail = (
                f"a repeat of this request within {refused.spec.per:g} s of the last one "
                f"(debounce {refused.name!r}); retry after {retry_s} s without repeating it"
            )
        elif refused.spec.algorithm == "throttle":
            detail = (
                f"the queue of throttle {refused.name!r} is full; retry after {retry_s} s"
            )
        else:
            detail = f"limit {refused.name!r} is exhausted; retry after {retry_s} s"
        req.extra.clear()
        raise Denial(problem, detail, headers=headers, extra={"limit": refused.name})

    def _admitted(self, req: Request, rows: list[Any], reply: list[Any]) -> None:
        """A throttle's wait, a debounce's join, or the first request of a joining burst."""
        ctx = req.ctx
        wait_ms = max((float(row[5]) for row in rows if len(row) > 5), default=0.0)
        joined = req.data.get("verdict") == "joined"
        if joined:
            self._join(req, reply[3])
        elif self.joins is not None:
            req.data["db_lead"] = req.data["rl_keys"][self.limits.index(self.joins)]
        if wait_ms > 0:
            ctx.decide("rate_limit", "delayed")
            req.data.setdefault(PAUSES, []).append(lambda: self._wait(ctx, wait_ms))
        elif not joined:
            ctx.decide("rate_limit", "allowed")

    @staticmethod
    async def _wait(ctx: Context, wait_ms: float) -> None:
        """A throttled request's turn: wait in this process, then go on."""
        THROTTLE_WAIT.labels(ctx.route).observe(wait_ms / 1000)
        ctx.note("throttle.wait_ms", round(wait_ms, 1))
        await sleep_ms(wait_ms)

    def _join(self, req: Request, found: list[Any]) -> None:
        """Answer a repeat with its first request's response, now or once it is stored."""
        assert self.joins is not None
        key = req.data["rl_keys"][self.limits.index(self.joins)]
        state, leader = reply_text(found[0]), reply_text(found[1])
        req.ctx.decide("rate_limit", "joined")
        if state == "1":
            req.data["answer"] = self._open(key, found[2:5])
            req.data["answer_headers"] = [JOINED]
            return
        req.data.setdefault(PAUSES, []).append(lambda: self._await_leader(req, key, leader))

    def _open(self, key: str, fields: list[Any]) -> Stored:
        try:
            return self.vault.unpack(key, *fields)
        except DataKeyError as exc:  # a record sealed with keys no longer configured
            raise _nothing_to_join() from exc

    async def _await_leader(self, req: Request, key: str, leader: str) -> None:
        """Poll the first request's record until it holds its response (then answer with it)."""
        lease_ms = float(self.joins.op[3]) if self.joins is not None else DEBOUNCE_LEASE_MS
        deadline = time.monotonic() + lease_ms / 1000
        pause = 2.0
        while time.monotonic() < deadline:
            await sleep_ms(pause)
            pause = min(pause * 2, 50.0)
            found = await self.store.run(
                "debounce_poll", [key], [], operation="debounce join", fail_open=False
            )
            if found[0] is None or reply_text(found[1]) != leader:
                break  # the first request ended without a response to share
            if reply_text(found[0]) == "1":
                req.data["answer"] = self._open(key, found[2:5])
                req.data["answer_headers"] = [JOINED]
                return
        raise _nothing_to_join()

    def keeps(self, req: Request) -> int | None:
        """The most body bytes kept of a response: a joining debounce's first request's."""
        return JOIN_MAX_BODY if req.data.get("db_lead") else None

    def after(self, req: Request, outcome: Outcome) -> None:
        """Release concurrency slots (shadowed ones too); share or drop a debounce's response."""
        if self.shadow_slots and req.data.get("rls_held"):
            keys = req.data["rls_keys"]
            for i in self.shadow_slots:
                req.finish("rel", [keys[i]], req.token)
        lead = req.data.get("db_lead")
        if lead is not None:
            stored = _shareable(outcome)
            if stored is None:
                req.finish("dbd", [lead], req.token)
            else:
                code, headers, body = self.vault.pack(stored, lead)
                per_ms = self.joins.op[1] if self.joins is not None else 1
                req.finish("dbs", [lead], req.token, code, headers, body, per_ms)
        if not self.slots or not req.data.get("rl_held"):
            return
        keys = req.data["rl_keys"]
        for i in self.slots:
            req.finish("rel", [keys[i]], req.token)


def _nothing_to_join() -> Denial:
    return Denial(
        Problems.RATE_LIMITED,
        "this request repeats one that ended without a response to share; retry",
        headers={"Retry-After": "1"},
    )


def _shareable(outcome: Outcome) -> Stored | None:
    """The response a debounce's first request shares: complete, small, without Set-Cookie."""
    stored = outcome.complete
    if stored is None or not outcome.handler_ran or len(stored.body) > JOIN_MAX_BODY:
        return None
    if any(name.lower() == b"set-cookie" for name, _ in stored.headers):
        return None
    return stored


def make_rate_limit_part(policy: RoutePolicy, store: ValkeyStore, vault: Vault) -> Part | None:
    """The rate-limit part of a route's fused state step."""
    if not policy.rate_limit:
        return None
    return RateLimitStep(store, list(policy.rate_limit), enforce=policy.enforce, vault=vault)
