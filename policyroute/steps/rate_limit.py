"""`rate_limit`: token buckets, sliding windows and concurrency caps on Valkey time."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends.valkey import Arg, Store
from ..errors import Denial, Problems, StorageError
from ..observability.metrics import backend_error
from ..observability.repeats import backend_warning
from ..observability.shadow import shadow_denial
from ..policy import RateLimit, RoutePolicy
from ..principal import address_tag
from .base import Context
from .slots import run_state
from .state import Header, Outcome, Part, Request, Vault, digest, principal_tag, route_id

# How long a concurrency slot outlives a process that died holding it (unless `lease`).
CONCURRENCY_LEASE_MS = 300_000

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
        return lambda ctx: address_tag(ctx.client)
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
        return f"c:{claim}:{digest(str(value))}" if value is not None else address_tag(ctx.client)

    return from_claim


def _from_header(name: str, prefix: str) -> TagOf:
    def tag(ctx: Context) -> str:
        value = ctx.headers.get(name)
        return prefix + digest(value) if value else address_tag(ctx.client)

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

    def item(self, remaining: int, reset_ms: int) -> str:
        """This limit's `RateLimit` header item (draft-ietf-httpapi-ratelimit-headers)."""
        t = max(0, -(-reset_ms // 1000))
        return f"{self.label};r={max(0, remaining)};t={t}"


def compile_limit(spec: RateLimit, index: int, names: set[str]) -> Limit:
    """Everything about one limit that does not depend on the request."""
    name = spec.name or (spec.key if spec.algorithm != "concurrency" else "concurrency")
    if name in names:
        name = f"{name}-{index}"
    names.add(name)
    if spec.algorithm == "concurrency":
        lease = round(spec.lease * 1000) if spec.lease else CONCURRENCY_LEASE_MS
        op: tuple[Arg, ...] = ("cc", spec.capacity, lease)
        item = f"{_sf_name(name)};q={spec.capacity}"
    else:
        per_ms = max(1, round((spec.per or 0) * 1000))
        if spec.algorithm == "token_bucket":
            refill = spec.refill or spec.capacity
            op = ("tb", spec.capacity, refill, per_ms, spec.cost)
            # The window in which an empty bucket fills again.
            window = math.ceil(spec.capacity * per_ms / refill / 1000)
        else:
            op = ("sw", spec.capacity, per_ms, spec.cost)
            window = math.ceil(per_ms / 1000)
        item = f"{_sf_name(name)};q={spec.capacity};w={window}"
    return Limit(spec, name, _tag_of(spec.key), str(index), op, item, _sf_name(name))


class RateLimitStep(Part):
    """Refuse with 429 when any limit of the route is exhausted; add RateLimit headers."""

    name = "rate_limit"

    def __init__(self, store: Store, limits: list[RateLimit], *, enforce: bool = True) -> None:
        self.store = store
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
        self.slots = tuple(i for i, lim in enumerate(self.limits) if lim.op[0] == "cc")
        self.shadow_slots = tuple(i for i, lim in enumerate(self.shadows) if lim.op[0] == "cc")
        self.watch_disconnect = bool(self.slots)  # a slot is freed when the client leaves

    def describe(self) -> str:
        """The limits in one line."""
        out = []
        for lim in self.compiled:
            s = lim.spec
            per = s.key + (" (chosen by the client)" if client_chosen(s.key) else "")
            if s.algorithm == "concurrency":
                out.append(f"{lim.name}: at most {s.capacity} in flight per {per}")
            elif s.algorithm == "token_bucket":
                out.append(
                    f"{lim.name}: token bucket of {s.capacity} per {per}, "
                    f"+{s.refill or s.capacity} per {s.per}s, cost {s.cost}"
                )
            else:
                out.append(f"{lim.name}: {s.capacity} per {s.per}s sliding window per {per}")
            if lim in self.shadows:
                out[-1] += " (shadow: enforce false)"
        return "; ".join(out)

    def prepare(self, req: Request) -> None:
        """Append one op per limit (shadowed limits: a probe beside the script)."""
        store, ctx = self.store, req.ctx
        rid = route_id(ctx.route)
        if self.shadows:
            self._probe(req, rid)
        if not self.limits:
            return
        keys = [store.key(lim.tag(ctx), "rl", rid, lim.index) for lim in self.limits]
        for key, lim in zip(keys, self.limits, strict=True):
            req.op((key,), (*lim.op, req.token) if lim.op[0] == "cc" else lim.op)
        req.data["rl_keys"] = keys

    def _probe(self, req: Request, rid: str) -> None:
        """Evaluate the shadowed limits in their own buckets (`rls`), as enforcement would."""
        store, ctx = self.store, req.ctx
        sub = Request(ctx, token=req.token)
        keys = [store.key(lim.tag(ctx), "rls", rid, lim.index) for lim in self.shadows]
        for key, lim in zip(keys, self.shadows, strict=True):
            sub.op((key,), (*lim.op, req.token) if lim.op[0] == "cc" else lim.op)
        req.data["rls_keys"] = keys

        async def evaluate() -> None:
            try:
                reply = await run_state(store, sub, "rate_limit (shadow)", True)
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
        for lim, row in zip(self.shadows, rows, strict=True):
            if not int(row[0]):
                refused = refused or lim
        ctx = req.ctx
        if refused is None:
            req.data["rls_held"] = True
            ctx.decide("rate_limit", "shadow_allowed")
            return
        ctx.decide("rate_limit", "shadow_limited")
        concurrency = refused.spec.algorithm == "concurrency"
        problem = Problems.CONCURRENCY_LIMITED if concurrency else Problems.RATE_LIMITED
        shadow_denial(ctx, "rate_limit", Denial(problem, f"limit {refused.name!r} is exhausted"))

    def settle(self, req: Request, reply: list[Any]) -> None:
        """Set the RateLimit headers; raise 429 when a limit refused."""
        if self.shadows:
            self._settle_shadow(req)
        if not self.limits:
            return
        rows = reply[1]
        items = []
        retry_ms = 0
        refused: Limit | None = None
        for lim, row in zip(self.limits, rows, strict=True):
            ok, remaining, reset_ms, wait_ms = int(row[0]), int(row[1]), int(row[2]), int(row[3])
            items.append(lim.item(remaining, reset_ms if ok else max(reset_ms, wait_ms)))
            if not ok:
                retry_ms = max(retry_ms, wait_ms)
                refused = refused or lim
        req.extra.append(self.policy_header)
        req.extra.append((b"ratelimit", ", ".join(items).encode()))
        if refused is None:
            req.data["rl_held"] = True
            req.ctx.decide("rate_limit", "allowed")
            return
        req.ctx.decide("rate_limit", "limited")
        retry = str(max(1, math.ceil(retry_ms / 1000)))
        headers = {k.decode(): v.decode() for k, v in req.extra}
        headers["Retry-After"] = retry
        concurrency = refused.spec.algorithm == "concurrency"
        problem = Problems.CONCURRENCY_LIMITED if concurrency else Problems.RATE_LIMITED
        req.extra.clear()
        raise Denial(
            problem,
            f"limit {refused.name!r} is exhausted; retry after {retry} s",
            headers=headers,
            extra={"limit": refused.name},
        )

    def after(self, req: Request, outcome: Outcome) -> None:
        """Release the concurrency slots this request holds (shadowed ones too)."""
        if self.shadow_slots and req.data.get("rls_held"):
            keys = req.data["rls_keys"]
            for i in self.shadow_slots:
                req.finish("rel", [keys[i]], req.token)
        if not self.slots or not req.data.get("rl_held"):
            return
        keys = req.data["rl_keys"]
        for i in self.slots:
            req.finish("rel", [keys[i]], req.token)


def make_rate_limit_part(policy: RoutePolicy, store: Store, vault: Vault) -> Part | None:
    """The rate-limit part of a route's fused state step."""
    if not policy.rate_limit:
        return None
    return RateLimitStep(store, list(policy.rate_limit), enforce=policy.enforce)
