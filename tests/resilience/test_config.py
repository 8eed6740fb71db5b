"""Configuration of resilience: clear errors at install, lint rules, explain lines."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import policyroute
from policyroute import ConfigError
from policyroute.review.lint import lint

from .apps import engine, install, make_app


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle`."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


UNKNOWN_PROFILE = """\
version: 1
resilience:
  db_primary:
    breaker: {failures: 5, reset: 30s}
routes:
  GET /work:
    public: true
    resilience: db_primry
"""


def test_unknown_profile_on_a_route_refuses_install_at_its_line(
    policy_dir: Path, valkey_url: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        install(policy_dir, UNKNOWN_PROFILE, valkey_url, Counter())
    [finding] = caught.value.findings
    assert finding.code == "unknown-resilience-profile"
    assert finding.location.file == str(policy_dir / "routes.yaml")
    assert finding.location.line == line_of(UNKNOWN_PROFILE, "resilience: db_primry")
    assert "did you mean 'db_primary'?" in finding.message


UNKNOWN_EXCEPTION = """\
version: 1
resilience:
  db_primary:
    retry:
      attempts: 3
      on: [5xx, ConnectionError, asyncio.NoSuchError]
routes:
  GET /work:
    public: true
"""


def test_unknown_exception_name_refuses_install_at_its_position(
    policy_dir: Path, valkey_url: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        install(policy_dir, UNKNOWN_EXCEPTION, valkey_url, Counter())
    [finding] = caught.value.findings
    assert finding.code == "unknown-exception"
    assert finding.location.line == line_of(UNKNOWN_EXCEPTION, "on: [")
    assert "asyncio has no 'NoSuchError'" in finding.message
    assert finding.dotted_path == "resilience.db_primary.retry.on[2]"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("retry: {on: [4xx]}", "only 5xx responses are retried"),
        ("retry: {on: ['not an exception']}", "invalid exception name"),
        ("retry: {initial: 2s, max: 1s}", "shorter than `initial`"),
        ("breaker: {exclude: [KeyError], reset: 0}", "`reset` must be a positive duration"),
        ("retry: {on: [NoSuchBuiltin]}", "not a builtin exception"),
        ("breaker: {exclude: [json.loads]}", "'json.loads' is not an exception class"),
    ],
)
def test_bad_settings_are_config_errors(
    policy_dir: Path, valkey_url: str, body: str, message: str
) -> None:
    policy = f"version: 1\nroutes:\n  GET /work:\n    public: true\n    {body}\n"
    with pytest.raises(ConfigError, match=message):
        install(policy_dir, policy, valkey_url, Counter())


def test_shared_breaker_needs_valkey(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text(
        "version: 1\nroutes:\n  GET /work:\n    public: true\n"
        "    breaker: {failures: 2, shared: true}\n"
    )
    with pytest.raises(ConfigError, match="needs the valkey backend"):
        policyroute.install(make_app(Counter()), policy_dir, settings=policyroute.Settings())


LINT = """\
version: 1
resilience:
  upstream:
    retry: {attempts: 3}
routes:
  POST /direct:
    public: true
    retry: {attempts: 3}
  PUT /via-profile:
    public: true
    resilience: upstream
  POST /keyed:
    public: true
    retry: {attempts: 3}
    idempotency: {header: Idempotency-Key}
  GET /safe:
    public: true
    retry: {attempts: 3}
  DELETE /once:
    public: true
    retry: {attempts: 1}
"""


def test_lint_flags_retry_of_unsafe_methods_without_idempotency(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text(LINT)
    findings = [f for f in lint([policy_dir]) if f.code == "retry-unsafe"]
    assert [(f.severity, f.location.line) for f in findings] == [
        ("error", line_of(LINT, "POST /direct:") + 2),
        ("error", line_of(LINT, "resilience: upstream")),
    ]
    assert "POST /direct retries POST requests" in findings[0].message


EXPLAIN = """\
version: 1
resilience:
  upstream:
    breaker: {failures: 5, reset: 30s, shared: true}
    retry: {attempts: 3, backoff: exponential, initial: 100ms, max: 2s, deadline: 5s}
    timeout: 2s
routes:
  GET /work:
    public: true
    resilience: upstream
"""


def test_explain_describes_the_step(policy_dir: Path, valkey_url: str) -> None:
    app = install(policy_dir, EXPLAIN, valkey_url, Counter())
    [chain] = [c for c in engine(app).chains() if c.route == "GET /work"]
    assert (
        "resilience: profile upstream: breaker 5 failures/30s (shared), "
        "retry 3x exponential 100ms..2s deadline 5s, timeout 2s"
    ) in repr(chain)
