"""One request's state ops on a Valkey cluster, where each hash tag may live on another node.

On one server every op of a request runs in one script call. On a cluster a script may
only touch keys of one slot, and a request's keys can carry several hash tags: a limit
keyed by client address next to credits keyed by subject, or a shared cache next to a
per-user idempotency record. Then the ops are split by tag and run so that the outcome
is the one a single script would give:

1. every rate-limit op, grouped by tag, all groups at once; when any group refuses, the
   tokens the other groups took are given back (limits stay all-or-nothing);
2. every other group in turn, shared-cache groups first (a hit costs no credits), the
   caller's own group (credits, idempotency, private cache) last; the first verdict that
   answers or refuses stops the run and releases a stampede lock an earlier group took.

Undo ops run with the request's after-handler ops, so they also survive cancellation.
Requests whose keys share one tag (the common case) still make exactly one call.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from ..backends.valkey import Arg, ValkeyStore

if TYPE_CHECKING:
    from .parts import Request

LIMIT_OPS = frozenset({"tb", "sw", "cc", "th", "db"})
Op = tuple[list[str], list[Arg]]


def hash_tag(key: str) -> str:
    """The part of a key a cluster hashes: the first non-empty `{...}`, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def split_ops(
    keys: Sequence[str], args: Sequence[Arg], marks: Sequence[tuple[int, int]]
) -> list[Op]:
    """The flat key and argument lists cut back into ops at their marks."""
    bounds = [*marks, (len(keys), len(args))]
    return [
        (list(keys[k0:k1]), list(args[a0:a1]))
        for (k0, a0), (k1, a1) in itertools.pairwise(bounds)
    ]


def by_tag(ops: Sequence[Op], indices: Sequence[int]) -> list[list[int]]:
    """Op indices grouped by the hash tag of their first key, in order of appearance."""
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(hash_tag(ops[i][0][0]), []).append(i)
    return list(groups.values())


def reply_text(value: Any) -> str:
    """A reply field as text (a reply read already, or merged on a cluster, is text)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _undo_limit(req: Request, op: Op) -> None:
    keys, args = op
    kind = args[0]
    if kind == "tb":
        req.finish("utb", keys, args[1], args[4])
    elif kind == "sw":
        req.finish("usw", keys, args[3])
    elif kind == "cc":
        req.finish("rel", keys, args[3])
    elif kind == "th":
        req.finish("uth", keys, float(args[1]) * int(args[5]))
    elif kind == "db":
        req.finish("dbd", keys, args[4])


def _release_lock(req: Request, op: Op) -> None:
    keys, args = op
    if args[0] == "ca":
        req.finish("cau", [keys[0]], args[2])


def state_reply(raw: Any) -> list[Any]:
    """`state.lua`'s flat reply as [verdict, limit rows, credit, answer].

    The script answers a head `verdict|row;row|credit` (each row `ok,left,reset,retry,cur,
    wait`, the credit `from_a,from_b,balance,period`), followed by the stored answer's
    fields when it answers (a replay, a cache hit, a joined response). A reply read
    already (a cluster's, merged from one call per tag) is returned as it is: the server
    sends bytes, a read reply starts with its verdict as text.
    """
    if type(raw) is bytes:  # the common reply: the head alone
        first: Any = raw
        answer: list[Any] = []
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        return raw
    elif isinstance(raw, list):
        first, answer = raw[0], raw[1:]
    else:
        first, answer = raw, []
    verdict, rows, credit = reply_text(first).split("|", 2)
    return [
        verdict,
        [row.split(",") for row in rows.split(";")] if rows else [],
        credit.split(",") if credit else [],
        answer,
    ]


def run_state(
    store: ValkeyStore, req: Request, operation: str, fail_open: bool
) -> Awaitable[Any]:
    """The before-handler verdict: one script call, or one per hash tag on a cluster.

    Not a coroutine itself: on one server (or one tag) it is the store's call, so the
    request's hot path awaits no extra frame. Read its reply with `state_reply`. The
    script's first argument is Valkey's time as the store reads it (`ValkeyStore.now`).
    """
    if not store.cluster or len({hash_tag(k) for k in req.keys}) < 2:
        args = [store.now(), *req.args]  # the script's first argument: Valkey's time
        return store.run(
            "state", req.keys, args, operation=operation, fail_open=fail_open, shares=True
        )
    return _run_state_by_tag(store, req, operation, fail_open)


async def _run_state_by_tag(
    store: ValkeyStore, req: Request, operation: str, fail_open: bool
) -> Any:
    ops = split_ops(req.keys, req.args, req.marks)

    async def call(group: list[int]) -> Any:
        keys = [k for i in group for k in ops[i][0]]
        args = [store.now(), *(a for i in group for a in ops[i][1])]
        return state_reply(
            await store.run("state", keys, args, operation=operation, fail_open=fail_open)
        )

    limits = [i for i, op in enumerate(ops) if op[1][0] in LIMIT_OPS]
    rows: dict[int, Any] = {}
    limit_groups = by_tag(ops, limits)
    replies = await asyncio.gather(*(call(g) for g in limit_groups))
    for group, reply in zip(limit_groups, replies, strict=True):
        rows.update(zip(group, reply[1], strict=True))
    verdicts = [reply_text(r[0]) for r in replies]
    if any(v not in ("go", "joined") for v in verdicts):
        for group, verdict in zip(limit_groups, verdicts, strict=True):
            if verdict != "rate":
                for i in group:
                    _undo_limit(req, ops[i])
        return ["rate", [rows[i] for i in limits], [], []]
    if "joined" in verdicts:
        # A debounce joins another request's response: nothing else is asked.
        answer = replies[verdicts.index("joined")][3]
        return ["joined", [rows[i] for i in limits], [], answer]

    rest = by_tag(ops, [i for i in range(len(ops)) if i not in rows])
    rest.sort(key=lambda g: not all(ops[i][1][0] == "ca" for i in g))  # shared caches first
    verdict = "go"
    credit: list[Any] = []
    locked: list[int] = []
    for group in rest:
        reply = await call(group)
        said = reply_text(reply[0])
        if said in ("go", "wait"):
            if said == "go":
                locked.extend(group)
            else:
                verdict = "wait"
            credit = reply[2] or credit
            continue
        for i in locked:
            _release_lock(req, ops[i])
        return [said, [rows[i] for i in limits], reply[2], reply[3]]
    return [verdict, [rows[i] for i in limits], credit, []]


async def run_finish(store: ValkeyStore, req: Request, operation: str) -> None:
    """The after-handler ops: one script call, or one per hash tag (at once) on a cluster."""
    if not store.cluster or len({hash_tag(k) for k in req.finish_keys}) < 2:
        await store.run(
            "finish", req.finish_keys, req.finish_args, operation=operation, fail_open=True
        )
        return
    ops = split_ops(req.finish_keys, req.finish_args, req.finish_marks)
    calls = []
    for group in by_tag(ops, range(len(ops))):
        keys = [k for i in group for k in ops[i][0]]
        args = [a for i in group for a in ops[i][1]]
        calls.append(store.run("finish", keys, args, operation=operation, fail_open=True))
    await asyncio.gather(*calls)
