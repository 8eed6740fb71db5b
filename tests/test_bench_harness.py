"""The bench harness: unique queries from both load generators, and the targets section."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from bench import cli, instructions, opcodes, pyload, report, targets, wrk
from bench.loadgen import LoadResult, Target
from bench.runner import Outcome, Round

AUTH = ("Authorization", "Bearer dev-only")
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


@dataclass
class Recorder:
    """A tiny keep-alive HTTP/1.1 server that records each request's target and auth header."""

    seen: list[tuple[str, str | None]] = field(default_factory=list)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer every request on the connection with 200 until the client goes."""
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.split("\r\n")
                headers = {k.lower(): v for k, _, v in (h.partition(": ") for h in lines if h)}
                self.seen.append((request_line.split(" ")[1], headers.get("authorization")))
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def paths(self) -> list[str]:
        """Return the request targets seen so far."""
        return [path for path, _ in self.seen]


@contextlib.asynccontextmanager
async def recording_server() -> AsyncIterator[tuple[Recorder, int]]:
    """Run a Recorder on a free loopback port; wait for its connections to end on exit."""
    recorder = Recorder()
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield recorder, port
    finally:
        server.close()
        await server.wait_closed()
        if recorder.handlers:
            await asyncio.wait(recorder.handlers, timeout=10)


def query_values(paths: list[str]) -> list[str]:
    """Return the ``n`` value of each ``/ping?n=...`` path (fails on any other path)."""
    values = []
    for path in paths:
        prefix, _, value = path.partition("?n=")
        assert prefix == "/ping" and value, path
        values.append(value)
    return values


# wrk -----------------------------------------------------------------------------------

needs_wrk = pytest.mark.skipif(not wrk.available(), reason="wrk is not installed")


@needs_wrk
async def test_wrk_gives_every_request_of_every_thread_its_own_query_and_keeps_headers() -> None:
    async with recording_server() as (recorder, port):
        target = Target("127.0.0.1", port, "/ping", (AUTH,), connections=4, unique_query=True)
        result = await asyncio.to_thread(wrk.Wrk().run, target, 1, 2)
    values = query_values(recorder.paths())
    assert result.requests > 0 and result.errors == 0
    assert len(values) >= result.requests
    assert len(set(values)) == len(values)
    # <run>-<thread>-<counter>: one run token, both threads numbered.
    assert len({v.split("-")[0] for v in values}) == 1
    assert {v.split("-")[1] for v in values} == {"0", "1"}
    assert {auth for _, auth in recorder.seen} == {AUTH[1]}


@needs_wrk
async def test_wrk_repeats_the_plain_path_without_unique_query() -> None:
    async with recording_server() as (recorder, port):
        target = Target("127.0.0.1", port, "/ping", (AUTH,), connections=2)
        assert wrk.command(target, 1, 1)[-1] == target.url
        result = await asyncio.to_thread(wrk.Wrk().run, target, 1, 1)
    assert result.requests > 0
    assert set(recorder.paths()) == {"/ping"}


def test_wrk_script_quotes_the_path_and_numbers_threads_in_setup() -> None:
    script = wrk.unique_query_script('/a"b?x=1', "r1")
    assert 'local prefix = "/a\\"b?x=1&n=r1-"' in script
    assert 'thread:set("thread_id", threads)' in script
    assert "wrk.format(nil, prefix .. thread_id" in script


# Python generator -------------------------------------------------------------------------


def test_python_request_source_numbers_each_request_and_keeps_the_rest_of_the_bytes() -> None:
    target = Target("127.0.0.1", 8000, "/ping", (AUTH,), unique_query=True)
    next_request = pyload.request_source(target, "run1")
    first, second = next_request(), next_request()
    assert first == pyload.encode_request(target, "/ping?n=run1-1")
    assert second == pyload.encode_request(target, "/ping?n=run1-2")
    assert b"\r\nAuthorization: Bearer dev-only\r\n" in first
    plain = pyload.request_source(Target("127.0.0.1", 8000, "/p?a=1", (AUTH,)), "run1")
    assert plain() == plain() == pyload.encode_request(Target("127.0.0.1", 8000, "/p?a=1", (AUTH,)))
    with_query = Target("127.0.0.1", 8000, "/p?a=1", unique_query=True)
    assert pyload.request_source(with_query, "r")().startswith(b"GET /p?a=1&n=r-1 HTTP/1.1\r\n")


def test_python_generator_command_line_carries_unique_query() -> None:
    target = Target("127.0.0.1", 8000, "/ping", (AUTH,), connections=3, unique_query=True)
    argv = pyload._command(target, 2)[3:]
    assert "--unique-query" in argv
    assert pyload._parse_args(argv) == (target, 2.0)
    plain = Target("127.0.0.1", 8000, "/ping", (AUTH,), connections=3)
    assert pyload._parse_args(pyload._command(plain, 2)[3:]) == (plain, 2.0)


async def test_python_generator_runs_never_repeat_a_query_across_connections_or_runs() -> None:
    async with recording_server() as (recorder, port):
        target = Target("127.0.0.1", port, "/ping", (AUTH,), connections=4, unique_query=True)
        warmup = await pyload.drive(target, 0.2)
        first_run = len(recorder.seen)
        measured = await pyload.drive(target, 0.2)
    values = query_values(recorder.paths())
    assert warmup.requests > 0 and measured.requests > 0
    assert warmup.errors == measured.errors == 0
    assert len(set(values)) == len(values)
    runs = [
        {v.split("-")[0] for v in values[:first_run]},
        {v.split("-")[0] for v in values[first_run:]},
    ]
    assert len(runs[0]) == len(runs[1]) == 1 and runs[0] != runs[1]


# targets ---------------------------------------------------------------------------------


def ok(name: str, rps: float) -> Outcome:
    """An outcome that measured ``rps``."""
    return Outcome(name, "wrk", LoadResult(int(rps), 0, 1.0, rps, 1.0, 2.0))


def failed(name: str) -> Outcome:
    """An outcome of a scenario that failed."""
    return Outcome(name, "wrk", None, "exited with code 1")


def test_targets_pass_miss_and_skip() -> None:
    outcomes = [
        ok("bare", 1000),
        ok("slowapi", 400),
        ok("policyroute_local", 850),
        ok("policyroute_full", 700),
        ok("bare_sleep_1ms_1conn", 500),
        ok("policyroute_cache_hit_1conn", 500),
    ]
    verdicts = {v.goal.label: v for v in targets.evaluate(outcomes)}
    assert {label: v.status for label, v in verdicts.items()} == {
        "policyroute_local >= 0.85 x bare": "PASS",
        "policyroute_full >= 0.65 x bare": "PASS",
        "policyroute_full >= 2 x slowapi": "MISS",
        # equal is not more
        "policyroute_cache_hit_1conn > 1 x bare_sleep_1ms_1conn": "MISS",
    }
    assert verdicts["policyroute_full >= 2 x slowapi"].value == pytest.approx(1.75)
    only_two = targets.evaluate([ok("bare", 1000), ok("policyroute_local", 800)])
    assert [v.goal.label for v in only_two] == ["policyroute_local >= 0.85 x bare"]
    assert targets.evaluate([ok("bare", 1000)]) == []


def test_targets_section_shows_values_and_a_failed_scenario_as_a_miss() -> None:
    verdicts = targets.evaluate([ok("bare", 1000), failed("policyroute_local")])
    text = report.targets_table(verdicts)
    assert text.splitlines()[0] == "targets (reported, not enforced):"
    assert "policyroute_local FAILED" in text and text.rstrip().endswith("MISS")
    shown = report.targets_table(targets.evaluate([ok("bare", 1000), ok("policyroute_local", 900)]))
    assert "0.90 x" in shown and "900 vs 1000" in shown and shown.rstrip().endswith("PASS")
    assert report.targets_table([]) == ""


def test_publish_reports_missed_targets_with_status_0_and_a_failure_with_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results.json"
    monkeypatch.setattr(cli, "RESULTS", results)
    meta = {"generator": "wrk", "cpu_pinning": "server=0 others=1", "connections": 32}
    meta["duration_s"] = 4
    missed = [ok("bare", 1000), ok("policyroute_local", 100)]
    assert cli.publish(missed, meta) == 0
    out = capsys.readouterr().out
    assert "policyroute_local >= 0.85 x bare" in out and "MISS" in out
    stored = json.loads(results.read_text())["targets"]
    assert stored[0]["status"] == "MISS" and stored[0]["measured"] == pytest.approx(0.1)
    assert stored[0]["kind"] == "ratio" and stored[0]["bound"] == 0.85
    assert cli.publish([ok("bare", 1000), failed("policyroute_local")], meta) == 1


def measured(
    name: str, rps: float, cpu: float | None, valkey: float | None, *rounds: Round
) -> Outcome:
    """An outcome with its worker's and Valkey's CPU µs per request, and its rounds if any."""
    return replace(ok(name, rps), cpu_us=cpu, backend_us=valkey, rounds=rounds)


def production(outcomes: list[Outcome]) -> dict[str, targets.Verdict]:
    """The production verdicts by label."""
    return {v.goal.label: v for v in targets.evaluate(outcomes, targets.PRODUCTION_GOALS)}


CPU_OVER = "policyroute_full cpu us/req <= bare + 55"
FULL_VALKEY = "policyroute_full valkey us/req <= 25"
LIMIT_VALKEY = "policyroute_limit valkey us/req <= 10"


def test_production_cpu_over_bare_is_the_median_of_per_round_differences() -> None:
    bare_rounds = (Round(5000, 130.0), Round(4500, 150.0), Round(4800, 170.0))
    bare = measured("bare", 4800, 150.0, None, *bare_rounds)
    # Round by round the full chain costs 55, 50 and 60 µs more than bare interpolated to
    # its place: the median, 55, passes. Its median round (200 µs) against bare's median
    # round (150 µs) would say 50.
    rounds = (
        Round(3500, 185.0, 5000, 130.0),
        Round(3000, 200.0, 4500, 150.0),
        Round(3200, 230.0, 4800, 170.0),
    )
    verdict = production([bare, measured("policyroute_full", 3200, 200.0, 20.0, *rounds)])[CPU_OVER]
    assert verdict.value == pytest.approx(55.0) and verdict.status == "PASS"
    over = (replace(rounds[0], cpu_us=186.0), replace(rounds[1], cpu_us=206.0), rounds[2])
    verdict = production([bare, measured("policyroute_full", 3200, 200.0, 20.0, *over)])[CPU_OVER]
    assert verdict.value == pytest.approx(56.0) and verdict.status == "MISS"
    # Rounds of another count than bare's do not pair: the two median rounds' figures.
    unpaired = production([bare, measured("policyroute_full", 3200, 206.0, 20.0, *over[:2])])
    assert unpaired[CPU_OVER].value == pytest.approx(56.0)
    # No rounds at all: the same.
    alone = measured("bare", 5000, 130.0, None)
    within = production([alone, measured("policyroute_full", 3200, 185.0, 20.0)])[CPU_OVER]
    beyond = production([alone, measured("policyroute_full", 3200, 185.5, 20.0)])[CPU_OVER]
    assert within.value == pytest.approx(55.0) and within.status == "PASS"
    assert beyond.value == pytest.approx(55.5) and beyond.status == "MISS"
    # A worker CPU that was not read, or a failed scenario, is a miss that says why.
    unread = production([alone, measured("policyroute_full", 3200, None, 20.0)])[CPU_OVER]
    assert (unread.value, unread.status) == (None, "MISS")
    assert unread.reason == "no cpu us/req for policyroute_full"
    assert production([failed("bare"), ok("policyroute_full", 3200)])[CPU_OVER].reason == (
        "bare FAILED"
    )


def test_production_valkey_bounds_pass_up_to_their_bound_and_miss_beyond() -> None:
    bare = ok("bare", 5000)
    at_bound = production(
        [bare, measured("policyroute_full", 3200, 200.0, 25.0), measured("policyroute_limit", 4000, 150.0, 10.0)]
    )
    assert at_bound[FULL_VALKEY].status == at_bound[LIMIT_VALKEY].status == "PASS"
    beyond = production(
        [bare, measured("policyroute_full", 3200, 200.0, 25.1), measured("policyroute_limit", 4000, 150.0, 10.2)]
    )
    assert (beyond[FULL_VALKEY].value, beyond[FULL_VALKEY].status) == (25.1, "MISS")
    assert (beyond[LIMIT_VALKEY].value, beyond[LIMIT_VALKEY].status) == (10.2, "MISS")
    # Valkey spending nothing is a figure, and within the bound.
    assert production([measured("policyroute_limit", 4000, 150.0, 0.0)])[LIMIT_VALKEY].status == "PASS"
    # Over rounds, the median of the rounds' figures: the median req/s round read 12 µs.
    runs = ((4000, 12.0), (3900, 9.5), (4100, 9.0))
    limit = cli.median_round([measured("policyroute_limit", r, 150.0, v) for r, v in runs])
    assert [r.backend_us for r in limit.rounds] == [12.0, 9.5, 9.0] and limit.backend_us == 12.0
    verdict = production([limit])[LIMIT_VALKEY]
    assert (verdict.value, verdict.status, verdict.figures) == (9.5, "PASS", "median of 3 rounds")
    # No Valkey figure, or a failed scenario: a miss with its reason. Not run: skipped.
    unread = production([measured("policyroute_limit", 4000, 150.0, None)])
    assert unread[LIMIT_VALKEY].status == "MISS"
    assert unread[LIMIT_VALKEY].reason == "no valkey us/req for policyroute_limit"
    assert production([failed("policyroute_limit")])[LIMIT_VALKEY].reason == "policyroute_limit FAILED"
    assert production([bare]) == {}
    assert set(production([measured("policyroute_full", 3200, 200.0, 20.0)])) == {FULL_VALKEY}


def test_production_cache_hit_over_one_connection_needs_2_5_times_a_1_ms_handler() -> None:
    sleep = ok("bare_sleep_1ms_1conn", 500)
    label = "policyroute_cache_hit_1conn >= 2.5 x bare_sleep_1ms_1conn"
    assert production([sleep, ok("policyroute_cache_hit_1conn", 1250)])[label].status == "PASS"
    assert production([sleep, ok("policyroute_cache_hit_1conn", 1240)])[label].status == "MISS"
    # The plain setup keeps its target: beat the 1 ms handler.
    (plain,) = targets.evaluate([sleep, ok("policyroute_cache_hit_1conn", 510)])
    assert (plain.goal.label, plain.status) == (
        "policyroute_cache_hit_1conn > 1 x bare_sleep_1ms_1conn",
        "PASS",
    )


def test_publish_prints_and_stores_every_production_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "RESULTS", tmp_path / "results.json")
    meta = {"generator": "wrk", "cpu_pinning": "server=0 others=1", "connections": 32}
    meta |= {"duration_s": 4, "setup": "production"}
    outcomes = [
        measured("bare", 5000, 130.0, 0.2),
        measured("slowapi", 1500, 340.0, 60.0),
        measured("policyroute_limit", 4000, 150.0, 9.2),
        measured("policyroute_local", 4600, 140.0, 0.0),
        measured("policyroute_full", 3600, 180.0, 31.4),
        ok("bare_sleep_1ms_1conn", 500),
        failed("policyroute_cache_hit_1conn"),
    ]
    assert cli.publish(outcomes, meta) == 1  # a scenario failed
    out = capsys.readouterr().out
    section = out[out.index("targets (reported, not enforced):") :].split("\n\n")[0]
    rows = {line.split("  ")[0]: line for line in section.splitlines()[2:]}
    assert list(rows) == [
        "policyroute_local >= 0.9 x bare",
        "policyroute_full >= 0.7 x bare",
        "policyroute_full >= 2.3 x slowapi",
        CPU_OVER,
        FULL_VALKEY,
        LIMIT_VALKEY,
        "policyroute_cache_hit_1conn >= 2.5 x bare_sleep_1ms_1conn",
    ]
    assert section.splitlines()[1].split() == ["target", "measured", "from", "status"]
    assert "0.92 x" in rows["policyroute_local >= 0.9 x bare"]
    assert "+50.0 us" in rows[CPU_OVER] and "180 vs 130 cpu us/req" in rows[CPU_OVER]
    assert rows[CPU_OVER].endswith("PASS")
    assert "31.4 us" in rows[FULL_VALKEY] and rows[FULL_VALKEY].endswith("MISS")
    assert "9.2 us" in rows[LIMIT_VALKEY] and rows[LIMIT_VALKEY].endswith("PASS")
    cache = rows["policyroute_cache_hit_1conn >= 2.5 x bare_sleep_1ms_1conn"]
    assert "policyroute_cache_hit_1conn FAILED" in cache and cache.endswith("MISS")
    stored = json.loads((tmp_path / "results-production.json").read_text())["targets"]
    by_label = {t["target"]: t for t in stored}
    assert by_label[CPU_OVER] | {"measured": pytest.approx(50.0)} == {
        "target": CPU_OVER,
        "kind": "difference",
        "scenario": "policyroute_full",
        "reference": "bare",
        "measure": "cpu_us",
        "comparison": "<=",
        "bound": 55,
        "measured": pytest.approx(50.0),
        "scenario_value": 180.0,
        "reference_value": 130.0,
        "status": "PASS",
        "reason": None,
    }
    assert by_label[FULL_VALKEY]["kind"] == "bound" and by_label[FULL_VALKEY]["reference"] is None
    assert (by_label[FULL_VALKEY]["measured"], by_label[FULL_VALKEY]["status"]) == (31.4, "MISS")
    missed = by_label["policyroute_cache_hit_1conn >= 2.5 x bare_sleep_1ms_1conn"]
    assert missed["measured"] is None and missed["reason"] == "policyroute_cache_hit_1conn FAILED"


def test_each_scenario_reports_its_median_round_and_a_failed_round_fails_it() -> None:
    assert cli.median_round([ok("a", 10), ok("a", 30), ok("a", 20)]).result == ok("a", 20).result
    assert cli.median_round([ok("a", 10), ok("a", 30)]).result == ok("a", 10).result
    assert cli.median_round([ok("a", 10), failed("a"), ok("a", 20)]).result is None


def test_ratios_are_medians_of_per_round_ratios_so_a_slow_spell_moves_both_sides() -> None:
    # Round 2 ran while the machine was slow for everyone: 1.5x fewer req/s on both sides.
    bare_rounds = [ok("bare", 1000), ok("bare", 600), ok("bare", 1100)]
    full_rounds = [ok("policyroute_full", 660), ok("policyroute_full", 400), ok("policyroute_full", 700)]
    bare, full = cli.median_round(bare_rounds), cli.median_round(full_rounds)
    assert [r.rps for r in full.rounds] == [660, 400, 700]
    # Medians taken apart: 660 / 1000 = 0.66; round by round: 0.66, 0.667, 0.636 -> 0.66.
    (verdict,) = [v for v in targets.evaluate([bare, full]) if v.goal.reference == "bare"]
    assert verdict.value == pytest.approx(0.66)
    skewed = [ok("bare", 1000), ok("bare", 600), ok("bare", 610)]
    # Taken apart the medians would say 660 / 610 = 1.08; paired by round it stays ~0.66.
    (paired,) = [
        v
        for v in targets.evaluate([cli.median_round(skewed), full])
        if v.goal.reference == "bare"
    ]
    assert paired.value == pytest.approx(0.667, abs=0.01)
    line = next(
        row for row in report.table([cli.median_round(skewed), full]).splitlines()
        if row.startswith("policyroute_full")
    )
    assert " 0.67 " in line


def test_the_baseline_brackets_each_round_and_is_interpolated_to_each_scenarios_place() -> None:
    from dataclasses import replace

    # The machine slows down steadily through the round: bare 1000 req/s at the start and
    # 700 when it runs again at the end; the full chain, third of the four runs, at 70 % of
    # the bare of its moment.
    opening = replace(ok("bare", 1000), cpu_us=100.0)
    run = [opening, ok("slowapi", 450), replace(ok("policyroute_full", 560), cpu_us=200.0)]
    closing = [replace(ok("bare", 700), cpu_us=160.0)]
    placed = cli.bracket(run, closing)
    assert [o.base for o in placed] == [(1000, 100.0), (900, 120.0), (800, 140.0)]
    full = cli.median_round([placed[2]])
    bare = cli.median_round([placed[0]])
    assert targets.paired_ratio(full, bare) == pytest.approx(0.70)
    assert targets.paired_ratio(full, bare, cpu=True) == pytest.approx(0.70)
    # Without the closing run (it failed) the opening one stands for the whole round.
    assert [o.base for o in cli.bracket(run, [failed("bare")])][2] == (1000, 100.0)
    # Against another scenario than the baseline, rounds pair as they ran.
    slowapi = cli.median_round([placed[1]])
    assert targets.paired_ratio(full, slowapi) == pytest.approx(560 / 450)


def test_the_table_shows_cpu_per_request_against_bare() -> None:
    from dataclasses import replace

    from bench import server

    rows = [
        replace(ok("bare", 5000), cpu_us=200.0, backend_us=0.2),
        replace(ok("policyroute_full", 2500), cpu_us=400.0, backend_us=47.6),
    ]
    text = report.table(rows)
    assert "cpu us/req" in text and "cpu vs bare" in text and "valkey us/req" in text
    full = next(line for line in text.splitlines() if line.startswith("policyroute_full"))
    assert " 400 " in full and " 0.50 " in full and " 48 " in full
    assert (server.cpu_seconds(os.getpid()) or 0) > 0  # this very process has used CPU


def test_the_valkey_servers_cpu_time_is_read_from_the_server_itself() -> None:
    from bench.backend import valkey

    with valkey() as backend:
        first = backend.cpu_seconds()
        backend.flush()
        assert 0 < first <= backend.cpu_seconds()


def test_bench_lua_reports_valkeys_time_per_request(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import lua

    before = (os.sched_getaffinity(0), os.environ.get("POLICYROUTE_VALKEY_URL"))
    assert lua.main(["limit", "--requests", "200", "--rounds", "2"]) == 0
    # The run pinned this process and set the URL; both are as they were again.
    assert (os.sched_getaffinity(0), os.environ.get("POLICYROUTE_VALKEY_URL")) == before
    line = capsys.readouterr().out.strip()
    # One token bucket: at most one script call a request (the calls of requests in
    # flight together share one), and Valkey's CPU time measured.
    assert line.startswith("limit: Valkey CPU ")
    assert 0 < float(line.split("; ")[-1].split()[0]) <= 1.0, line
    assert float(line.split("Valkey CPU ")[1].split()[0]) > 0


def test_the_bench_routes_pay_nothing_for_lockout_replay_throttle_and_debounce(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import calls

    assert calls.main(["limit", "local"]) == 0
    out = capsys.readouterr().out
    assert "PASS limit: 1.00 script calls per request" in out
    assert "PASS local: 0.00 script calls per request" in out
    # A route making more calls than before is a MISS (here: an expectation of none).
    monkeypatch.setitem(calls.BEFORE, "limit", (calls.BEFORE["limit"][0], 0.0))
    assert calls.main(["limit"]) == 1
    assert "MISS limit" in capsys.readouterr().out


CALLGRIND = """\
# callgrind format
events: Ir
summary: 950

fn=(1) main
0 100
cfn=(2) work
calls=3 0
0 850
fn=(2)
0 600
cfn=(3) leaf
calls=1 0
0 250
fn=(3)
+2 200
-1 50
"""


def test_instruction_counts_are_each_function_s_own_not_what_it_calls(tmp_path: Path) -> None:
    # A callee's line after `calls=` is its inclusive cost: counted where it runs, not twice.
    path = tmp_path / "run.cg"
    path.write_text(CALLGRIND)
    own = instructions.costs(path)
    assert own == {"main": 100, "work": 600, "leaf": 250}
    assert sum(own.values()) == 950


async def test_the_server_count_sends_exactly_the_requests_it_counts_each_with_its_query() -> None:
    # `bench.instructions server` divides the server's instructions by this count: 13
    # requests over 8 connections must be 13 requests, each with its own query and the
    # scenario's headers.
    async with recording_server() as (recorder, port):
        answered = await instructions._load(port, "/ping", (("Authorization", "Bearer t"),), 13, 5)
    assert answered == 13
    values = query_values(recorder.paths())
    assert len(values) == len(set(values)) == 13
    assert all(v.startswith("5-") for v in values)
    assert {auth for _, auth in recorder.seen} == {"Bearer t"}


def test_opcode_counts_name_the_chain_s_own_functions(
    valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `bench.opcodes` is how the chain's interpreted work is split by function: the core
    # chain's requests run the chain's frame once each, and bare's never.
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", valkey_url)
    monkeypatch.setenv("BENCH_POLICY", "core")
    core, bare = opcodes.measure("core"), opcodes.measure("bare")
    chain = [name for name in core if name.startswith("policyroute/asgi/chain.py:")]
    assert chain and all(core[name] >= opcodes.COUNTED for name in chain)
    assert not any(name.startswith("policyroute/asgi/chain.py:") for name in bare)
    assert sum(core.values()) > sum(bare.values())


def test_ab_names_scenarios_short_and_refuses_unknown_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from bench import ab

    assert ab._names("core,full,bare,policyroute_limit") == [
        "policyroute_core", "policyroute_full", "bare", "policyroute_limit"
    ]
    if not wrk.available():
        pytest.skip("bench.ab checks for wrk before the scenarios")
    with pytest.raises(SystemExit) as exited:
        ab.main(["core,nosuch", "--against", str(tmp_path)])
    assert exited.value.code == 2
    assert "unknown scenarios: policyroute_nosuch" in capsys.readouterr().err


def test_the_valkey_allocator_is_read_from_the_server_memory_map() -> None:
    from bench import backend

    assert backend.loaded_allocator(os.getpid()) in ("jemalloc", "libc")
    assert backend.loaded_allocator(2**22 + 12345) == "unknown"  # no such process
    with backend.valkey("libc") as plain:
        assert plain.allocator == "libc"
    if backend.jemalloc_library() is None:
        pytest.skip("libjemalloc2 is not installed")
    with backend.valkey("jemalloc") as production:
        assert production.allocator == "jemalloc"
    assert "LD_PRELOAD" not in os.environ  # put back after the server started
