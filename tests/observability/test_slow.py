"""`slow: 50ms`: a handler that takes at least that long is logged and counted, never cut."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from policyroute.review.explain import explain

from .kit import install, running, sample, write

ROUTE = "GET /items/{item}"


async def test_a_slow_handler_is_logged_and_counted(
    policy_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = install(policy_dir, "  GET /items/{item}: {public: true, slow: 50ms}\n")
    before = sample("policyroute_slow_handlers_total", route=ROUTE)
    with caplog.at_level(logging.WARNING, logger="policyroute"):
        async with running(app) as c:
            fast = await c.get("/items/a")
            slow = await c.get("/items/b?sleep=0.08")
    assert fast.status_code == slow.status_code == 200  # a warning, never a cut
    warnings = [r for r in caplog.records if "slow handler" in r.getMessage()]
    assert len(warnings) == 1
    record = warnings[0]
    assert record.getMessage().startswith("policyroute: slow handler on GET /items/{item}: ")
    fields = record.__dict__
    assert fields["duration_ms"] >= 80 and fields["slow_ms"] == 50
    assert fields["request_id"] == slow.headers["x-request-id"]
    assert sample("policyroute_slow_handlers_total", route=ROUTE) == before + 1


def test_explain_shows_the_slow_step_last(policy_dir: Path) -> None:
    write(policy_dir, "  GET /items/{item}: {public: true, slow: 500ms, timeout: 2s}\n")
    text = explain([policy_dir])
    steps = [line.strip() for line in text.splitlines() if line.strip()[:2] in ("1.", "2.")]
    assert steps[-1] == "2. slow: warn when the handler takes 500ms or more"
