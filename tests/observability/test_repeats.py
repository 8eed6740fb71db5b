"""Repeated backend warnings: one line per route and cause per interval, with a count."""

from __future__ import annotations

import logging

import pytest

from policyroute.observability.repeats import Repeats


def test_lines_per_route_and_cause_with_counts_on_a_clock(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    repeats = Repeats(logging.getLogger("policyroute"), interval=10.0, clock=lambda: now[0])

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records]

    with caplog.at_level(logging.WARNING, logger="policyroute"):
        for _ in range(5):  # no event loop here: counts wait for the next line
            repeats.warning("GET /a", "valkey:state:open", "down")
        repeats.warning("GET /b", "valkey:state:open", "down")
        repeats.warning("GET /a", "valkey:finish:open", "lost")
        assert said() == [
            "policyroute: GET /a: down (repeats on this route are logged every 10s, counted)",
            "policyroute: GET /b: down (repeats on this route are logged every 10s, counted)",
            "policyroute: GET /a: lost (repeats on this route are logged every 10s, counted)",
        ]
        caplog.clear()
        now[0] = 112.5
        repeats.warning("GET /a", "valkey:state:open", "still down")  # 4 held back + this one
        now[0] = 113.0
        repeats.warning("GET /a", "valkey:state:open", "still down")
        assert said() == ["policyroute: GET /a: still down (5 times on this route in the last 12.5s)"]
        caplog.clear()
        repeats.flush()  # what engine_stop does: the last counts are not lost
        assert said() == ["policyroute: GET /a: still down (1 time on this route in the last 0.5s)"]
        caplog.clear()
        now[0] = 200.0
        repeats.warning("GET /b", "valkey:state:open", "down again")  # quiet since: a first line
        assert said() == [
            "policyroute: GET /b: down again (repeats on this route are logged every 10s, counted)"
        ]
