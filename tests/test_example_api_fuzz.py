"""schemathesis against the example app's OpenAPI document: no 500s, every answer as documented.

The example runs in a real uvicorn on the session's Valkey and broker. Requests come with
no token and with a DEV ONLY token holding every scope and role the example names, so
both the refusals and the handlers are exercised. Intended 5xx (a retried 503, a breaker's
503, a timeout's 504) are fine when the document lists them; a 500 never is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from policyroute.identity.dev import load_private_key, mint
from tests.servers import REPO, uvicorn

SCOPES = [
    "run:io_jobs", "read:user", "read:reports", "payouts:write", "search", "read:catalog",
    "write:orders", "write:notes", "read:notes",
]  # fmt: skip
ROLES = ["io_job_runner", "admin"]


@pytest.fixture(scope="module")
def example(valkey_url: str, pulsar_url: str) -> Iterator[str]:
    """The example app in one uvicorn worker: its base URL."""
    with uvicorn(
        REPO / "examples" / "policies",
        valkey_url,
        app="examples.app:app",
        factory=False,
        probe="/health",
        env={"POLICYROUTE_PULSAR_URL": pulsar_url},
    ) as served:
        yield served.base


@pytest.fixture(scope="module")
def example_schema(example: str) -> Any:
    """The example's OpenAPI document, as generated (with policyroute's security and problems)."""
    return schemathesis.openapi.from_url(example + "/openapi.json")


def _token() -> str:
    key = load_private_key(Path(REPO / "examples" / "keys" / "dev-private-jwk.json"))
    return mint(key, "fuzzer", scopes=SCOPES, roles=ROLES, amr=["mfa"], ttl=3600)


TOKEN = _token()


SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _check(case: Any, headers: dict[str, str]) -> None:
    response = case.call(headers=headers, timeout=10)
    assert response.status_code != 500, response.text
    case.validate_response(
        response,
        checks=(status_code_conformance, content_type_conformance, response_schema_conformance),
    )


def _fuzz(api: Any, headers: dict[str, str]) -> int:
    """Run every operation's generated cases; return how many operations were fuzzed."""
    count = 0
    for result in api.get_all_operations():
        operation = result.ok()

        @SETTINGS
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            _check(case, headers)

        run()
        count += 1
    return count


def test_anonymous_callers_get_documented_answers(example_schema: Any) -> None:
    assert _fuzz(example_schema, {}) >= 15


def test_a_caller_with_every_scope_gets_documented_answers(example_schema: Any) -> None:
    assert _fuzz(example_schema, {"Authorization": f"Bearer {TOKEN}"}) >= 15
