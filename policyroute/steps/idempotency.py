"""`idempotency`: draft-ietf-httpapi-idempotency-key-header on Valkey (400/409/422/replay)."""

from __future__ import annotations

import re
from typing import Any

from .._types import format_duration, format_size
from ..asgi.body import read_body
from ..backends.keys import digest, route_id
from ..backends.valkey import ValkeyStore
from ..compile.step import Context
from ..crypto import DataKeyError
from ..errors import Denial, Problems
from ..language.policy import Idempotency, RoutePolicy
from ..observability.shadow import shadow_denial
from .parts import PLAIN, Outcome, Part, Request, Stored, Vault, principal_tag

# An in-flight record outlives a process that died holding it for at most this long.
IN_FLIGHT_MS = 300_000
_KEY = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e]{1,255})"$|^([\x21-\x7e]{1,255})$')
REPLAYED = (b"idempotent-replayed", b"true")
_DECISION = {"inflight": "in_flight", "reused": "reused", "replay": "replay"}


def parse_key(raw: str) -> str | None:
    """The key of an Idempotency-Key header (an sf-string, or a bare token); None if bad."""
    found = _KEY.match(raw.strip())
    if found is None:
        return None
    return found.group(1) or found.group(2)


class IdempotencyStep(Part):
    """Run a request once per key; replay the stored response for repeats."""

    name = "idempotency"

    def __init__(
        self, store: ValkeyStore, spec: Idempotency, vault: Vault = PLAIN, *, enforce: bool = True
    ) -> None:
        self.store = store
        # A route in shadow mode records a missing or malformed key and goes on without one;
        # conflicts (409, 422) are always enforced: they keep a request from running twice.
        self.enforce = enforce
        self.spec = spec
        self.vault = vault
        self.header = spec.header.lower()
        self.fail_open = spec.on_backend_error == "open"
        self.ttl_ms = max(1, round(spec.ttl * 1000))
        self.lock_ms = round(spec.lock * 1000) if spec.lock else min(self.ttl_ms, IN_FLIGHT_MS)

    def describe(self) -> str:
        """Header, ttl and whether it is required."""
        need = "required" if self.spec.required else "optional"
        return (
            f"{self.spec.header} {need}, records kept {format_duration(self.spec.ttl)}, "
            f"responses up to {format_size(self.spec.max_body)} replayed, "
            f"request bodies over {format_size(self.body_limit)} refused (413)"
        )

    needs_io = True  # the body is read to fingerprint the request

    async def prepare_io(self, req: Request) -> None:
        """400 when the key is missing or malformed; else append the record op."""
        ctx = req.ctx
        raw = ctx.headers.get(self.header)
        if raw is None:
            if self.spec.required:
                self._refuse(
                    ctx,
                    Denial(
                        Problems.IDEMPOTENCY_KEY_MISSING,
                        f"this route requires an {self.spec.header} header",
                    ),
                )
            return
        key = parse_key(raw)
        if key is None:
            self._refuse(
                ctx,
                Denial(
                    Problems.IDEMPOTENCY_KEY_INVALID,
                    f"{self.spec.header} must be a string of 1 to 255 visible characters",
                ),
            )
            return
        body = await read_body(ctx, self.body_limit)
        parts = (ctx.method, ctx.scope.get("path", ""), ctx.scope.get("query_string", b""))
        head = b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts)
        fp = self.vault.fingerprint(head + b"\0" + body)
        record = self.store.key(principal_tag(ctx), "id", route_id(ctx.route), digest(key))
        req.op((record,), ("id", fp, self.lock_ms))
        req.data["id_key"] = record

    def _refuse(self, ctx: Context, denial: Denial) -> None:
        if self.enforce:
            raise denial
        shadow_denial(ctx, "idempotency", denial)

    def settle(self, req: Request, reply: list[Any]) -> None:
        """409 while in flight, 422 for another payload, the stored response for a repeat."""
        if "id_key" not in req.data:
            return
        verdict = req.data["verdict"]
        req.ctx.decide("idempotency", _DECISION.get(verdict, "new"))
        if verdict == "inflight":
            raise Denial(
                Problems.IDEMPOTENCY_IN_FLIGHT,
                "a request with this key is still being processed; retry later",
                headers={"Retry-After": "1"},
            )
        if verdict == "reused":
            raise Denial(
                Problems.IDEMPOTENCY_KEY_REUSED,
                "this key was already used with a different request",
            )
        if verdict == "replay":
            try:
                stored = self.vault.unpack(req.data["id_key"], *reply[3])
            except DataKeyError as exc:
                raise Denial(
                    Problems.RECORD_UNREADABLE,
                    "the stored response for this key cannot be decrypted with the current "
                    "data keys",
                ) from exc
            if stored.unkept:
                raise Denial(
                    Problems.IDEMPOTENCY_RESPONSE_NOT_KEPT,
                    f"the request with this key completed with status {stored.status}; its "
                    f"response ({stored.unkept} bytes) was larger than this route keeps "
                    f"({self.spec.max_body} bytes), so it cannot be replayed",
                    extra={"original_status": stored.status},
                )
            req.data["answer"] = stored
            req.data["answer_headers"] = [REPLAYED]
            return
        req.data["id_owner"] = True

    def keeps(self, req: Request) -> int | None:
        """Up to `max_body` bytes of the response of a request that owns its record."""
        return self.spec.max_body if req.data.get("id_owner") else None

    def after(self, req: Request, outcome: Outcome) -> None:
        """Store the completed response for replay, or drop the record so a retry can run.

        A response larger than `max_body` is not kept: the record keeps its status alone,
        so a repeat is refused (409) rather than run a second time.
        """
        if not req.data.get("id_owner"):
            return
        key = req.data["id_key"]
        if not outcome.done or outcome.status >= 500:
            req.finish("idd", [key])
            return
        stored = outcome.complete
        if stored is None or len(stored.body) > self.spec.max_body:
            stored = Stored(outcome.status, [], b"", unkept=max(outcome.size, 1))
            req.ctx.decide("unkept", "idempotency")
        code, headers, body = self.vault.pack(stored, key)
        req.finish("ids", [key], code, headers, body, self.ttl_ms)


def make_idempotency_part(policy: RoutePolicy, store: ValkeyStore, vault: Vault) -> Part | None:
    """The idempotency part of a route's fused state step."""
    if policy.idempotency is None:
        return None
    return IdempotencyStep(store, policy.idempotency, vault, enforce=policy.enforce)
