"""`state_tb.lua`, the single-bucket state call, answers and writes as `state.lua` does."""

from __future__ import annotations

import uuid

import pytest

from policyroute.backends.valkey import Arg, ValkeyStore
from policyroute.steps.slots import state_reply, state_script

DAY_MS = 86_400_000


def test_only_a_call_whose_one_op_is_a_token_bucket_takes_the_short_script() -> None:
    assert state_script(["tb", 3, 3, DAY_MS, 1]) == "state_tb"
    assert state_script(["tb", 3, 3, DAY_MS, 1, "tb", 5, 5, 1000, 1]) == "state"
    assert state_script(["tb", 3, 3, DAY_MS, 1, "ca", 1000, "tok"]) == "state"
    assert state_script(["sw", 3, 1000, 1, "x"]) == "state"
    assert state_script(["cr", 1, 0, "", 1000, "tok"]) == "state"


@pytest.mark.parametrize("cost", [1, 2])
async def test_the_short_script_answers_and_stores_what_the_general_one_does(
    valkey_url: str, cost: int
) -> None:
    # One bucket of 3 that refills 3 a day, so the ms between the two calls change nothing
    # the replies show: each call goes to both scripts, each on its own bucket.
    store = ValkeyStore(valkey_url, prefix="t" + uuid.uuid4().hex[:10])
    args: list[Arg] = ["tb", 3, 3, DAY_MS, cost]
    buckets = {"state": store.key("a", "tb", "r"), "state_tb": store.key("b", "tb", "r")}
    try:
        for _ in range(4):
            replies = {
                script: state_reply(
                    await store.run(script, [key], args, operation="t", fail_open=False)
                )
                for script, key in buckets.items()
            }
            general, short = replies["state"], replies["state_tb"]
            assert (short[0], short[2], short[3]) == (general[0], general[2], general[3])
            (
                (g_ok, g_left, g_reset, g_retry, g_cur, g_wait),
                (s_ok, s_left, s_reset, s_retry, s_cur, s_wait),
            ) = (
                [int(x) for x in general[1][0]],
                [int(x) for x in short[1][0]],
            )
            assert (s_ok, s_left, s_cur, s_wait) == (g_ok, g_left, g_cur, g_wait)
            assert (s_retry == 0) == (g_retry == 0) and abs(s_retry - g_retry) < 1000
            assert abs(s_reset - g_reset) < 1000
            stored = {
                script: await store.command("GET", key, operation="t")
                for script, key in buckets.items()
            }
            if stored["state"] is None:
                assert stored["state_tb"] is None
                continue
            g_tokens, s_tokens = (float(stored[s].split(b" ")[0]) for s in buckets)
            assert abs(s_tokens - g_tokens) < 1e-3
            ttls = [await store.command("PTTL", key, operation="t") for key in buckets.values()]
            assert abs(ttls[0] - ttls[1]) < 1000
        # The bucket ran out the same way in both: 3 tokens, `cost` a call.
        assert general[0] == "rate" and int(general[1][0][2]) > 0
    finally:
        await store.stop()
