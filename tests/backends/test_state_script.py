"""`state.lua`'s one-bucket path answers and writes as its general loop does."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from policyroute.backends.valkey import Arg, ValkeyStore
from policyroute.steps.slots import state_reply

from .kit import server_ms

DAY_MS = 86_400_000


@pytest.mark.parametrize("clock", ["server", "worker"])
@pytest.mark.parametrize("cost", [1, 2])
async def test_one_bucket_alone_answers_and_stores_what_the_general_loop_does(
    valkey_url: str, cost: int, clock: str
) -> None:
    # One bucket of 3 that refills 3 a day, so the ms between the two calls change nothing
    # the replies show. Alone it takes the short path; followed by a second bucket that
    # always allows (another key) the same call goes through the general loop. The time is
    # the server's (`""`: the script reads TIME) or given, as a worker gives it.
    store = ValkeyStore(valkey_url, prefix="t" + uuid.uuid4().hex[:10])
    bucket: list[Arg] = ["tb", 3, 3, DAY_MS, cost]
    roomy: list[Arg] = ["tb", 10**9, 10**9, DAY_MS, 1]
    short_key, general_key = store.key("a", "tb", "r"), store.key("b", "tb", "r")
    calls = {
        "general": ([general_key, store.key("c", "tb", "r")], bucket + roomy),
        "short": ([short_key], bucket),
    }
    buckets = {"general": general_key, "short": short_key}
    try:
        for _ in range(4):
            now: Arg = "" if clock == "server" else await server_ms(store)
            replies = {
                path: state_reply(
                    await store.run("state", keys, [now, *args], operation="t", fail_open=False)
                )
                for path, (keys, args) in calls.items()
            }
            general, short = replies["general"], replies["short"]
            assert (short[0], short[2], short[3]) == (general[0], general[2], general[3])
            g_ok, g_left, g_reset, g_retry, g_cur, g_wait = (int(x) for x in general[1][0])
            s_ok, s_left, s_reset, s_retry, s_cur, s_wait = (int(x) for x in short[1][0])
            assert len(short[1]) == 1
            assert (s_ok, s_left, s_cur, s_wait) == (g_ok, g_left, g_cur, g_wait)
            assert (s_retry == 0) == (g_retry == 0) and abs(s_retry - g_retry) < 1000
            assert abs(s_reset - g_reset) < 1000
            stored = {
                path: await store.command("GET", key, operation="t")
                for path, key in buckets.items()
            }
            if stored["general"] is None:
                assert stored["short"] is None
                continue
            g_tokens, s_tokens = (float(stored[p].split(b" ")[0]) for p in buckets)
            assert abs(s_tokens - g_tokens) < 1e-3
            ttls = [await store.command("PTTL", key, operation="t") for key in buckets.values()]
            assert abs(ttls[0] - ttls[1]) < 1000
        # The bucket ran out the same way on both paths: 3 tokens, `cost` a call.
        assert general[0] == "rate" and int(general[1][0][2]) > 0
    finally:
        await store.stop()


@pytest.mark.parametrize("second", [False, True])
async def test_a_bucket_s_stamp_never_goes_back_so_no_time_is_refilled_twice(
    valkey_url: str, second: bool
) -> None:
    # Each worker reads Valkey's time off its own clock, so one may be a little behind
    # another. A bucket of 10 that refills 1 a second: half taken at T, half again at T+5 s
    # (5 refilled), then 1 by a worker that reads T+2 s. Were its stamp stored, the next
    # call at T+5 s would refill those 3 s again; the bucket holds 4, and a call for 5 is
    # refused. Alone (the short path) and beside a second bucket (the general loop).
    store = ValkeyStore(valkey_url, prefix="t" + uuid.uuid4().hex[:10])
    keys = [store.key("a", "tb", "r")]
    roomy: list[Arg] = []
    if second:
        keys.append(store.key("b", "tb", "r"))
        roomy = ["tb", 10**6, 10**6, 1000, 1]

    async def take(at: int, cost: int) -> list[Any]:
        args: list[Arg] = [at, "tb", 10, 10, 10_000, cost, *roomy]
        return state_reply(await store.run("state", keys, args, operation="t", fail_open=False))

    try:
        start = await server_ms(store)
        assert (await take(start, 5))[0] == "go"
        assert (await take(start + 5000, 5))[1][0][1] == "5"  # refilled 5, took 5: 5 left
        behind = await take(start + 2000, 1)
        assert behind[0] == "go" and behind[1][0][1] == "4"  # nothing refilled: 4 left
        stored = await store.command("GET", keys[0], operation="t")
        assert stored.split(b" ")[1] == str(start + 5000).encode()
        again = await take(start + 5000, 5)
        assert again[0] == "rate" and again[1][0][4] == "4"
        # the behind worker is told to wait from its own time: 3 s to the stamp, 1 s more
        later = await take(start + 2000, 5)
        assert later[0] == "rate" and int(later[1][0][3]) == 4000
    finally:
        await store.stop()


async def test_one_bucket_then_other_ops_answers_and_stores_what_the_general_loop_does(
    valkey_url: str,
) -> None:
    # One bucket followed by a cache lookup takes the one-bucket path and goes on to the
    # lookup; with a second bucket that always allows in between, the same call goes
    # through the general loop. Both answer alike call after call: allowed and locked,
    # allowed and told to wait on the lock, then refused with no lookup made.
    store = ValkeyStore(valkey_url, prefix="t" + uuid.uuid4().hex[:10])
    bucket: list[Arg] = ["tb", 2, 2, DAY_MS, 1]
    roomy: list[Arg] = ["tb", 10**9, 10**9, DAY_MS, 1]
    paths = {
        "one": [store.key("a", "tb", "r"), store.key("a", "ce", "x")],
        "general": [store.key("b", "tb", "r"), store.key("c", "tb", "r"), store.key("b", "ce", "x")],
    }
    try:
        for call in range(3):
            now = await server_ms(store)
            lookup: list[Arg] = ["ca", 60_000, f"tok{call}"]
            one = state_reply(
                await store.run(
                    "state", paths["one"], [now, *bucket, *lookup], operation="t", fail_open=False
                )
            )
            general = state_reply(
                await store.run(
                    "state", paths["general"], [now, *bucket, *roomy, *lookup],
                    operation="t", fail_open=False,
                )
            )  # fmt: skip
            assert one[0] == general[0] == ["go", "wait", "rate"][call]
            assert one[1] == general[1][:1] and one[2:] == general[2:]
            locks = [await store.command("GET", keys[-1], operation="t") for keys in paths.values()]
            assert locks[0] == locks[1] == b"Ltok0"  # taken by the first call only
            buckets = [await store.command("GET", keys[0], operation="t") for keys in paths.values()]
            assert buckets[0].split(b" ")[0] == buckets[1].split(b" ")[0]
    finally:
        await store.stop()


async def test_a_reservation_writes_every_account_field_that_changes(valkey_url: str) -> None:
    # An allowance of 2 a day, then a balance of 3: reservations of 1 take the allowance
    # first, then the balance. Once only the balance changes, only it is written; the
    # allowance, its period and the bound on the holds stay as the last full write left
    # them, and a hold that expires sooner than the bound lowers it.
    store = ValkeyStore(valkey_url, prefix="t" + uuid.uuid4().hex[:10])
    keys = [store.key("u", "credits"), store.key("u", "credits", "held"),
            store.key("u", "credits", "swept")]  # fmt: skip

    async def reserve(n: int, hold: int = 900_000) -> list[Any]:
        args: list[Arg] = [now, "cr", 1, 2, "day", hold, f"tok{n}"]
        return state_reply(await store.run("state", keys, args, operation="t", fail_open=False))

    async def fields() -> dict[bytes, bytes]:
        flat = await store.command("HGETALL", keys[0], operation="t")
        return dict(zip(flat[::2], flat[1::2], strict=True))

    try:
        now = await server_ms(store)
        await store.command("HSET", keys[0], "b", 3, operation="t")
        day = str(now // DAY_MS).encode()
        taken = [await reserve(n) for n in range(5)]
        assert [t[2][:3] for t in taken] == [
            ["1", "0", "4"], ["1", "0", "3"], ["0", "1", "2"], ["0", "1", "1"], ["0", "1", "0"]
        ]
        assert await fields() == {b"b": b"0", b"a": b"0", b"p": day, b"n": str(now + 900_000).encode()}
        assert (await reserve(5))[0] == "credits"
        await store.command("HINCRBY", keys[0], "b", 1, operation="t")
        assert (await reserve(6, hold=1000))[2][:3] == ["0", "1", "0"]
        assert await fields() == {b"b": b"0", b"a": b"0", b"p": day, b"n": str(now + 1000).encode()}
        held = await store.command("ZRANGE", keys[1], 0, -1, operation="t")
        assert len(held) == 6
    finally:
        await store.stop()
