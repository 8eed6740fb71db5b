"""Auto-pipelining on a real Valkey: batching, NOSCRIPT recovery, timeouts, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from typing import Any

import pytest
import valkey.asyncio as avalkey
from valkey.exceptions import ValkeyError

from policyroute.admin.credits import set_balance, show
from policyroute.backends.embedded import start_valkey
from policyroute.backends.pipeline import Pipeline
from policyroute.backends.valkey import Arg, ValkeyStore
from policyroute.errors import StorageError
from policyroute.steps.slots import state_reply


def _store(url: str) -> ValkeyStore:
    return ValkeyStore(url, prefix="p" + uuid.uuid4().hex[:8])


async def test_concurrent_calls_leave_in_one_write_and_get_their_own_replies(
    valkey_url: str,
) -> None:
    for batch, most in ((1000, 1), (8, 25)):
        pipeline = Pipeline(valkey_url, batch=batch)
        try:
            await pipeline.execute("PING")  # connect first
            calls = [pipeline.execute("ECHO", f"v{i}") for i in range(200)]
            replies = await asyncio.gather(*calls)
            assert replies == [f"v{i}".encode() for i in range(200)]
            assert pipeline.commands == 201
            # One tick's commands share writes: one, or one per `batch` commands.
            assert pipeline.writes - 1 <= most
        finally:
            await pipeline.close()


async def test_error_replies_go_to_their_caller_only(valkey_url: str) -> None:
    pipeline = Pipeline(valkey_url)
    try:
        results = await asyncio.gather(
            pipeline.execute("ECHO", "a"),
            pipeline.execute("NOSUCHCOMMAND"),
            pipeline.execute("ECHO", "b"),
            return_exceptions=True,
        )
        assert results[0] == b"a" and results[2] == b"b"
        assert isinstance(results[1], Exception) and "unknown command" in str(results[1]).lower()
    finally:
        await pipeline.close()


async def test_database_from_the_url_is_selected(valkey_url: str) -> None:
    url = valkey_url.rsplit("/", 1)[0] + "/3"
    pipeline = Pipeline(url)
    key = "db3-" + uuid.uuid4().hex
    plain = avalkey.from_url(url)  # type: ignore[no-untyped-call]
    try:
        await pipeline.execute("SET", key, "x")
        assert await plain.get(key) == b"x"
    finally:
        await pipeline.close()
        await plain.aclose()


async def test_script_flush_is_recovered_transparently(valkey_url: str) -> None:
    store = _store(valkey_url)
    keys = [store.key("s:alice", "rl", "r", "0")]
    args: list[str | int] = ["", "tb", 5, 5, 60_000, 1]  # "": the script reads TIME
    try:
        first = await store.run("state", keys, args, operation="t", fail_open=False)
        await store.command("SCRIPT", "FLUSH", operation="flush")
        second = await store.run("state", keys, args, operation="t", fail_open=False)
        first, second = state_reply(first), state_reply(second)
        assert first[0] == second[0] == "go"
        assert int(first[1][0][1]) == 4 and int(second[1][0][1]) == 3  # tokens left
    finally:
        await store.stop()


async def test_a_stalled_server_times_out_then_the_connection_recovers(valkey_url: str) -> None:
    pipeline = Pipeline(valkey_url, timeout=0.2)
    blocker = avalkey.from_url(valkey_url)  # type: ignore[no-untyped-call]
    try:
        assert await pipeline.execute("ECHO", "warm") == b"warm"
        await blocker.execute_command("CLIENT", "PAUSE", "600", "ALL")
        started = time.monotonic()
        with pytest.raises(Exception, match="Timeout"):
            await pipeline.execute("ECHO", "late")
        assert time.monotonic() - started < 0.4
        await asyncio.sleep(0.5)
        # The late reply of the timed-out call must never reach a later caller.
        assert await pipeline.execute("ECHO", "fresh") == b"fresh"
    finally:
        await pipeline.close()
        await blocker.aclose()


async def test_server_stop_fails_fast_and_restart_reconnects() -> None:
    server = start_valkey()
    store = _store(server.url)
    keys = [store.key("s:bob", "rl", "r", "0")]
    args: list[str | int] = ["", "tb", 5, 5, 60_000, 1]  # "": the script reads TIME
    try:
        assert state_reply(await store.run("state", keys, args, operation="t", fail_open=False))[0] == "go"
        server.stop()
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            await store.run("state", keys, args, operation="limits", fail_open=True)
        assert time.monotonic() - started < 0.3
        assert caught.value.fail_open and "limits" in str(caught.value)
        server.restart()
        # A fresh server: no scripts loaded, a new connection; both recovered on the next call.
        reply = await store.run("state", keys, args, operation="t", fail_open=False)
        assert state_reply(reply)[0] == "go"
    finally:
        await store.stop()
        server.stop()


async def test_every_argument_type_reaches_the_server_as_its_text(valkey_url: str) -> None:
    # bytes, text, ints, floats and a bool (which the C packer refuses) all round-trip.
    pipeline = Pipeline(valkey_url)
    values: list[str | bytes | int | float] = [b"\x00\xff", "é", -5, 10**30, 0.1, 1e20, True]
    try:
        replies = await asyncio.gather(*(pipeline.execute("ECHO", v) for v in values))
        assert replies == [b"\x00\xff", "é".encode(), b"-5", b"1" + b"0" * 30, b"0.1", b"1e+20", b"1"]
    finally:
        await pipeline.close()


BUCKET: list[str | int] = ["", "tb", 100, 100, 60_000, 1]  # "": the script reads TIME


async def _tokens_left(store: ValkeyStore, keys: list[str]) -> int:
    """Take one more token and say how many are left."""
    reply = await store.run("state", keys, BUCKET, operation="t", fail_open=False)
    return int(state_reply(reply)[1][0][1])


async def test_submitted_calls_are_seen_by_later_calls_even_after_a_script_flush(
    valkey_url: str,
) -> None:
    store = _store(valkey_url)
    keys = [store.key("s:carol", "rl", "r", "0")]
    errors: list[StorageError] = []
    try:
        assert await _tokens_left(store, keys) == 99
        for _ in range(5):  # nobody awaits these; the next call is sent behind them
            store.submit("state", keys, BUCKET, operation="t", on_error=errors.append)
        assert await _tokens_left(store, keys) == 93
        await store.command("SCRIPT", "FLUSH", operation="flush")
        for _ in range(3):  # NOSCRIPT: loaded again and sent again, still nobody waiting
            store.submit("state", keys, BUCKET, operation="t", on_error=errors.append)
        await store.settle()
        assert await _tokens_left(store, keys) == 89
        assert errors == []
    finally:
        await store.stop()


async def test_submitted_calls_keep_their_order_on_a_server_that_lacks_the_script() -> None:
    # Nobody awaits a submitted call, so a NOSCRIPT reply (then a reload and a resend)
    # would land it behind the calls queued after it: a released slot or a stored record
    # not yet there for the next request. Scripts are loaded first on every connection.
    server = start_valkey()  # a fresh server: no script loaded yet
    store = _store(server.url)
    keys = [store.key("s:frank", "rl", "r", "0")]
    errors: list[StorageError] = []
    try:
        for _ in range(5):
            store.submit("state", keys, BUCKET, operation="t", on_error=errors.append)
        assert await _tokens_left(store, keys) == 94
        server.stop()
        with pytest.raises(StorageError):
            await _tokens_left(store, keys)  # the connection is found dead
        server.restart()  # no script loaded again
        for _ in range(5):
            store.submit("state", keys, BUCKET, operation="t", on_error=errors.append)
        assert await _tokens_left(store, keys) == 94  # the restarted server kept no data
        assert errors == []
    finally:
        await store.stop()
        server.stop()


async def test_a_submitted_call_that_fails_reaches_its_error_callback() -> None:
    server = start_valkey()
    store = ValkeyStore(server.url, prefix="p" + uuid.uuid4().hex[:8], retry_for=0.0)
    keys = [store.key("s:dave", "rl", "r", "0")]
    errors: list[StorageError] = []
    try:
        assert await _tokens_left(store, keys) == 99
        server.stop()
        store.submit("state", keys, BUCKET, operation="the finish", on_error=errors.append)
        started = time.monotonic()
        await store.settle()
        assert time.monotonic() - started < 0.3
        assert len(errors) == 1
        assert errors[0].fail_open and "the finish" in str(errors[0])
    finally:
        await store.stop()


async def test_a_submitted_call_that_meets_a_paused_server_lands_after_the_resume() -> None:
    # A commit, refund or release queued while Valkey is stalled is sent again until it
    # lands: the response has gone, so nothing else would ever settle it.
    server = start_valkey()
    store = _store(server.url)
    errors: list[StorageError] = []
    try:
        keys = await _locks(store, 6)
        os.kill(server.pid, signal.SIGSTOP)
        for i, key in enumerate(keys):
            _unlock(store, key, str(i), errors)
        await asyncio.sleep(0.8)  # the connection fails at its timeout; the calls wait
        os.kill(server.pid, signal.SIGCONT)
        await store.settle()
        assert errors == []
        assert await store.command("EXISTS", *keys, operation="t") == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGCONT)
        await store.stop()
        server.stop()


async def test_stop_gives_up_on_an_unreachable_server_in_bounded_time() -> None:
    server = start_valkey()
    store = ValkeyStore(server.url, prefix="p" + uuid.uuid4().hex[:8], stop_wait=0.5)
    keys = [store.key("s:gus", "rl", "r", "0")]
    errors: list[StorageError] = []
    try:
        assert await _tokens_left(store, keys) == 99
        server.stop()
        store.submit("state", keys, BUCKET, operation="the release", on_error=errors.append)
        await asyncio.sleep(0.4)  # failed once, waiting to be sent again
        assert errors == []
        started = time.monotonic()
        await store.stop()
        assert time.monotonic() - started < 1.0
        assert len(errors) == 1 and "the release" in str(errors[0])
    finally:
        with contextlib.suppress(Exception):
            server.stop()


async def test_stop_sends_and_settles_every_submitted_call_first(valkey_url: str) -> None:
    store = _store(valkey_url)
    keys = [store.key("s:erin", "rl", "r", "0")]
    errors: list[StorageError] = []
    assert await _tokens_left(store, keys) == 99
    for _ in range(40):
        store.submit("state", keys, BUCKET, operation="t", on_error=errors.append)
    await store.stop()  # at once: the 40 calls are still queued or in flight
    fresh = ValkeyStore(valkey_url, prefix=store.prefix)
    try:
        assert await _tokens_left(fresh, keys) == 58
        assert errors == []
    finally:
        await fresh.stop()


async def _locks(store: ValkeyStore, n: int) -> list[str]:
    """`n` stampede locks (cache keys holding `L<token>`), each token its own index."""
    keys = [store.key("s:gina", "ce", str(i)) for i in range(n)]
    for i, key in enumerate(keys):
        await store.command("SET", key, f"L{i}", operation="t")
    await store.run("finish", [], [], operation="t", fail_open=False)  # loaded: no ops
    return keys


def _unlock(store: ValkeyStore, key: str, token: str, errors: list[StorageError]) -> None:
    store.submit("finish", [key], ["cau", token], operation="t", on_error=errors.append, joins=True)


async def test_joined_calls_share_one_command_and_keep_their_order(valkey_url: str) -> None:
    store = _store(valkey_url)
    errors: list[StorageError] = []
    try:
        keys = await _locks(store, 6)
        assert store.pipeline is not None
        before = store.pipeline.commands
        for i, key in enumerate(keys[:3]):
            _unlock(store, key, str(i), errors)
        # A command queued between joined calls ends the join: it must see the first three
        # unlocked and the last three not yet.
        held = store.pipeline.execute("EXISTS", *keys)  # queued now, not when awaited
        for i, key in enumerate(keys[3:], start=3):
            _unlock(store, key, str(i), errors)
        assert await held == 3
        assert await store.command("EXISTS", *keys, operation="t") == 0
        assert store.pipeline.commands - before == 4  # 3 joined, EXISTS, 3 joined, EXISTS
        assert errors == []
    finally:
        await store.stop()


async def test_a_joined_call_stays_within_its_argument_bound(valkey_url: str) -> None:
    store = _store(valkey_url)
    errors: list[StorageError] = []
    try:
        keys = await _locks(store, 600)  # 2 arguments each: 1,200 in all, over 512 a call
        assert store.pipeline is not None
        before = store.pipeline.commands
        for i, key in enumerate(keys):
            _unlock(store, key, str(i), errors)
        assert await store.command("EXISTS", *keys, operation="t") == 0
        assert store.pipeline.commands - before == 4  # 256 + 256 + 88 joined, then EXISTS
        assert errors == []
    finally:
        await store.stop()


async def test_every_joined_caller_hears_of_a_failure_and_a_flush_is_recovered() -> None:
    server = start_valkey()
    store = ValkeyStore(server.url, prefix="p" + uuid.uuid4().hex[:8], retry_for=0.3)
    errors: list[StorageError] = []
    try:
        keys = await _locks(store, 4)
        await store.command("SCRIPT", "FLUSH", operation="t")
        for i, key in enumerate(keys[:2]):  # NOSCRIPT: each caller sends its own ops again
            _unlock(store, key, str(i), errors)
        await store.settle()
        assert await store.command("EXISTS", *keys, operation="t") == 2
        server.stop()
        for i, key in enumerate(keys[2:], start=2):
            store.submit("finish", [key], ["cau", str(i)], operation=f"unlock {i}",
                         on_error=errors.append, joins=True)
        await store.settle()
        assert sorted(e.operation for e in errors) == ["unlock 2", "unlock 3"]
    finally:
        await store.stop()


async def test_one_callers_bad_key_costs_no_other_joined_caller_its_ops(valkey_url: str) -> None:
    store = _store(valkey_url)
    errors: list[StorageError] = []
    try:
        keys = await _locks(store, 3)
        await store.command("DEL", keys[1], operation="t")
        await store.command("HSET", keys[1], "f", "v", operation="t")  # GET on it: WRONGTYPE
        for i, key in enumerate(keys):
            store.submit("finish", [key], ["cau", str(i)], operation=f"unlock {i}",
                         on_error=errors.append, joins=True)
        await store.settle()
        # The joined call stopped at the second caller's op; the third still ran.
        assert await store.command("EXISTS", keys[0], keys[2], operation="t") == 0
        assert [e.operation for e in errors] == ["unlock 1"]
        assert "WRONGTYPE" in str(errors[0])
    finally:
        await store.stop()



async def _arrivals(pipeline: Pipeline, seconds: float, pause: tuple[float, float], pid: int) -> tuple[int, int, int]:
    """One-shot callers arriving every 2 ms (as requests do), each an ECHO of its own name.

    The server is paused (SIGSTOP) from `pause[0]` to `pause[1]` seconds in. Returns
    (own replies, errors, another caller's replies).
    """
    counts = [0, 0, 0]

    async def one(name: str) -> None:
        try:
            reply = await asyncio.wait_for(pipeline.execute("ECHO", name), 3)
        except (OSError, TimeoutError, ValkeyError):
            counts[1] += 1
            return
        counts[0 if reply == name.encode() else 2] += 1

    callers = []
    start = time.monotonic()
    stopped = resumed = False
    n = 0
    while (elapsed := time.monotonic() - start) < seconds:
        if elapsed > pause[0] and not stopped:
            os.kill(pid, signal.SIGSTOP)
            stopped = True
        if elapsed > pause[1] and not resumed:
            os.kill(pid, signal.SIGCONT)
            resumed = True
        n += 1
        callers.append(asyncio.ensure_future(one(f"r{n}")))
        await asyncio.sleep(0.002)
    await asyncio.gather(*callers)
    return counts[0], counts[1], counts[2]


@pytest.mark.parametrize("scripts", [False, True], ids=["bare", "with-handshake"])
async def test_a_paused_server_never_hands_a_caller_another_callers_reply(scripts: bool) -> None:
    # SIGSTOP for 0.6 s while requests keep arriving (a GC pause, a slow fsync, a stalled
    # network look the same): reconnects meet a server that accepts but does not answer,
    # so handshakes time out while other callers queue commands. Every caller gets its
    # own reply or an error, never another caller's, and the pipeline serves normally
    # within 2 s of the resume.
    server = start_valkey()
    pipeline = Pipeline(server.url)
    if scripts:  # a script to load makes every reconnect start with a handshake
        pipeline.register("e0a1fb4f1e1a7a0c3d1b6c7b8d9e0f1a2b3c4d5e", "return 1")
    try:
        assert await pipeline.execute("ECHO", "warm") == b"warm"
        own, errors, wrong = await _arrivals(pipeline, 2.5, (0.3, 0.9), server.pid)
        assert wrong == 0, f"{wrong} of {own + errors + wrong} callers got another caller's reply"
        assert errors > 0 and own > 0  # the pause was felt, and calls got through around it
        resumed = time.monotonic()
        while True:
            try:
                assert await pipeline.execute("ECHO", "after") == b"after"
                break
            except (OSError, TimeoutError, ValkeyError):
                assert time.monotonic() - resumed < 2
                await asyncio.sleep(0.02)
        replies = await asyncio.gather(*(pipeline.execute("ECHO", f"x{i}") for i in range(200)))
        assert replies == [f"x{i}".encode() for i in range(200)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGCONT)
        await pipeline.close()
        server.stop()


async def test_a_large_write_does_not_time_out_the_commands_queued_behind_it(
    valkey_url: str,
) -> None:
    # Ten 10 MB records at once take the server a while to read; the small commands queued
    # behind them on the shared connection wait but are not failed as if the server were dead.
    pipeline = Pipeline(valkey_url)
    keys = ["big-" + uuid.uuid4().hex for _ in range(10)]
    record = b"x" * 10_000_000
    try:
        await pipeline.execute("PING")
        for new in (1, 0):  # HSET answers how many fields it added
            big = [pipeline.execute("EVAL", _HSET, 1, key, record) for key in keys]
            await asyncio.sleep(0)  # the records leave in a write of their own
            small = [pipeline.execute("ECHO", f"s{i}") for i in range(50)]
            assert await asyncio.gather(*big) == [new] * 10
            assert await asyncio.gather(*small) == [f"s{i}".encode() for i in range(50)]
        assert await pipeline.execute("HSTRLEN", keys[-1], "bd") == 10_000_000
    finally:
        await pipeline.execute("DEL", *keys)
        await pipeline.close()


_HSET = "return redis.call('HSET', KEYS[1], 'bd', ARGV[1])"


@pytest.mark.parametrize(
    "command", [("SUBSCRIBE", "a", "b"), ("monitor",), ("CLIENT", "REPLY", "OFF"), ("HELLO", "3")]
)
async def test_commands_without_exactly_one_reply_are_refused(
    valkey_url: str, command: tuple[str, ...]
) -> None:
    # One of these would shift every later reply onto the next caller in line.
    pipeline = Pipeline(valkey_url)
    try:
        with pytest.raises(ValueError, match="exactly one reply"):
            pipeline.execute(*command)
        assert await pipeline.execute("CLIENT", "SETNAME", "ok") == b"OK"
        assert await pipeline.execute("ECHO", "still-paired") == b"still-paired"
    finally:
        await pipeline.close()


async def test_accounts_whose_names_differ_only_in_braces_never_share_a_key(
    valkey_url: str,
) -> None:
    # A subject may hold any character: 'a{b', 'a(b' and 'a%7Bb' are three accounts.
    store = _store(valkey_url)
    names = ["a{b", "a(b", "a%7Bb", "a}b", "a)b"]
    try:
        for amount, name in enumerate(names, start=1):
            await set_balance(store, name, amount)
        assert [(await show(store, name)).granted for name in names] == [1, 2, 3, 4, 5]
        for name in names:
            key = store.key("s:" + name, "credits")
            assert key.count("{") == 1 and key.count("}") == 1  # one hash tag, whole
    finally:
        await store.stop()


# -- state calls shared by the requests of one tick (`Pipeline.share`) ---------------------

DAY_MS = 86_400_000


def _bucket_call(store: ValkeyStore, name: str, cap: int = 3) -> tuple[list[str], list[Arg]]:
    """A state call that takes one token from its own bucket (with the server's time)."""
    return [store.key("s:" + name, "tb", "r", "0")], ["", "tb", cap, cap, DAY_MS, 1]


def _row(reply: Any) -> tuple[str, list[str]]:
    verdict, rows, _, _ = state_reply(reply)
    return verdict, rows[0][:2]  # whether allowed, tokens left


async def test_state_calls_of_one_tick_share_one_command_and_each_gets_its_own_reply(
    valkey_url: str,
) -> None:
    # Ten callers in one tick, with buckets in three different states; the same calls made
    # one by one on another prefix answer alike. A cache hit answers with the stored entry:
    # an array within the shared reply, handed to its caller whole.
    store, alone = _store(valkey_url), _store(valkey_url)
    try:
        for s in (store, alone):
            await s.command("SET", s.key("s:c", "ce", "x"), "Estored", operation="t")
        calls = {
            s: [_bucket_call(s, f"u{i % 3}", cap=1 + i % 3) for i in range(9)]
            + [([s.key("s:c", "ce", "x")], ["", "ca", 1000, "tok"])]
            for s in (store, alone)
        }
        expected = [
            await alone.run("state", k, a, operation="t", fail_open=False) for k, a in calls[alone]
        ]
        assert store.pipeline is not None
        await store.run("state", *_bucket_call(store, "warm"), operation="t", fail_open=False)
        before = store.pipeline.commands
        shared = await asyncio.gather(
            *(store.run("state", k, a, operation="t", fail_open=False, shares=True)
              for k, a in calls[store])
        )  # fmt: skip
        assert store.pipeline.commands - before == 1
        assert [_row(r) for r in shared[:9]] == [_row(r) for r in expected[:9]]
        # Buckets of 1, 2 and 3 tokens, asked 3 times each in turn.
        verdicts = ["go", "go", "go", "rate", "go", "go", "rate", "rate", "go"]
        assert [_row(r)[0] for r in shared[:9]] == verdicts
        assert state_reply(shared[9])[0] == state_reply(expected[9])[0] == "hit"
        assert state_reply(shared[9])[3] == state_reply(expected[9])[3] == [b"Estored"]
    finally:
        await store.stop()
        await alone.stop()


async def test_one_callers_failing_ops_cost_no_other_sharing_caller_its_reply(
    valkey_url: str,
) -> None:
    store = _store(valkey_url)
    try:
        calls = [_bucket_call(store, f"v{i}") for i in range(3)]
        await store.command("HSET", calls[1][0][0], "f", "v", operation="t")  # GET: WRONGTYPE
        assert store.pipeline is not None
        await store.run("state", *_bucket_call(store, "warm"), operation="t", fail_open=False)
        before = store.pipeline.commands
        results = await asyncio.gather(
            *(store.run("state", k, a, operation=f"call {i}", fail_open=False, shares=True)
              for i, (k, a) in enumerate(calls)),
            return_exceptions=True,
        )  # fmt: skip
        assert store.pipeline.commands - before == 1
        assert isinstance(results[1], StorageError) and "WRONGTYPE" in str(results[1])
        assert results[1].operation == "call 1"
        assert [_row(results[i]) for i in (0, 2)] == [("go", ["1", "2"])] * 2
        # The others' tokens were taken, once each.
        for i in (0, 2):
            stored = await store.command("GET", calls[i][0][0], operation="t")
            assert stored.split(b" ")[0] == b"2"
    finally:
        await store.stop()


async def test_a_script_flush_before_shared_calls_is_recovered_for_every_caller(
    valkey_url: str,
) -> None:
    store = _store(valkey_url)
    try:
        calls = [_bucket_call(store, f"w{i}") for i in range(4)]
        await store.run("state", *calls[0], operation="t", fail_open=False)  # loaded once
        await store.command("SCRIPT", "FLUSH", operation="t")
        replies = await asyncio.gather(
            *(store.run("state", k, a, operation="t", fail_open=False, shares=True)
              for k, a in calls)
        )  # fmt: skip
        # Each caller loaded the script and sent its call again, alone: taken once each.
        assert [_row(r) for r in replies] == [("go", ["1", "1"])] + [("go", ["1", "2"])] * 3
    finally:
        await store.stop()


async def test_every_sharing_caller_hears_of_a_stopped_server() -> None:
    server = start_valkey()
    store = ValkeyStore(server.url, prefix="p" + uuid.uuid4().hex[:8])
    try:
        calls = [_bucket_call(store, f"x{i}") for i in range(3)]
        await store.run("state", *calls[0], operation="t", fail_open=False)
        server.stop()
        results = await asyncio.gather(
            *(store.run("state", k, a, operation=f"call {i}", fail_open=True, shares=True)
              for i, (k, a) in enumerate(calls)),
            return_exceptions=True,
        )  # fmt: skip
        assert [type(r) for r in results] == [StorageError] * 3
        assert [r.operation for r in results if isinstance(r, StorageError)] == [
            "call 0", "call 1", "call 2"
        ]
    finally:
        await store.stop()
        with contextlib.suppress(Exception):  # stopped above, unless the test failed first
            server.stop()


async def test_a_cancelled_sharing_caller_leaves_the_others_their_replies(
    valkey_url: str,
) -> None:
    store = _store(valkey_url)
    try:
        calls = [_bucket_call(store, f"y{i}") for i in range(3)]
        await store.command("PING", operation="t")
        tasks = [
            asyncio.ensure_future(
                store.run("state", k, a, operation="t", fail_open=False, shares=True)
            )
            for k, a in calls
        ]
        await asyncio.sleep(0)  # every call queued, none answered
        tasks[1].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[1], asyncio.CancelledError)
        assert [_row(results[i]) for i in (0, 2)] == [("go", ["1", "2"])] * 2
        # The cancelled caller's call was sent with the others: its token is taken too
        # (a request cancelled after its call was queued cannot unsend it).
        assert (await store.command("GET", calls[1][0][0], operation="t")).startswith(b"2 ")
    finally:
        await store.stop()


async def test_a_shared_call_stays_within_its_argument_bound(valkey_url: str) -> None:
    store = _store(valkey_url)
    try:
        calls = [_bucket_call(store, f"z{i}") for i in range(100)]  # 7 arguments a section
        assert store.pipeline is not None
        await store.run("state", *_bucket_call(store, "warm"), operation="t", fail_open=False)
        before = store.pipeline.commands
        replies = await asyncio.gather(
            *(store.run("state", k, a, operation="t", fail_open=False, shares=True)
              for k, a in calls)
        )  # fmt: skip
        assert store.pipeline.commands - before == 2  # 73 sections (511 arguments), then 27
        assert [_row(r) for r in replies] == [("go", ["1", "2"])] * 100
    finally:
        await store.stop()
