"""The compiler: makers run in request-path order whatever order their modules were imported."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from policyroute import steps
from policyroute.compile import compiler
from policyroute.review.explain import explain
from policyroute.steps import BUILTIN, load_builtin
from tests.steps.identity_kit import SETTINGS

POLICY = f"""\
version: 1
{SETTINGS}routes:
  POST /all:
    ip_allowlist: [127.0.0.1/32]
    scopes: [a]
    rate_limit: {{key: user, capacity: 5, per: 1m}}
    credits: {{cost: 1}}
    idempotency: {{}}
    sensitive: true
    encrypt_fields: [ssn]
    events: {{topic: persistent://public/default/all}}
    retry: {{attempts: 2}}
    breaker: {{failures: 3}}
    timeout: 2s
"""


def _step_names(text: str) -> list[str]:
    return [line.split(". ", 1)[1].split(":", 1)[0] for line in text.splitlines() if ". " in line]


def test_steps_follow_the_request_path_even_when_imported_out_of_order(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (policy_dir / "p.yaml").write_text(POLICY)
    expected = [
        "client",
        "ip_allowlist",
        "auth",
        "scopes",
        "state",
        "fields",
        "events",
        "resilience",
    ]
    assert _step_names(explain([policy_dir]))[: len(expected)] == expected
    # A fresh registry filled in the worst order: the last step module imported first.
    original = list(compiler.MAKERS)
    monkeypatch.setattr(compiler, "MAKERS", [])
    for name in reversed(BUILTIN):
        module = sys.modules[f"policyroute.steps.{name}"]
        if not str(module.__file__).endswith(".py"):
            # A compiled module runs its body once a process: its makers, as it registered
            # them, in this order.
            compiler.MAKERS.extend(m for m in original if m[1].__module__ == module.__name__)
            continue
        # Both are put back after the test, so other tests keep the original modules.
        monkeypatch.setattr(steps, name, module)
        monkeypatch.delitem(sys.modules, module.__name__)
        importlib.import_module(module.__name__)
    load_builtin()
    names = [maker.__module__.rsplit(".", 1)[1] for _, maker in compiler.MAKERS]
    assert names == sorted(names, key=BUILTIN.index)
    assert _step_names(explain([policy_dir]))[: len(expected)] == expected
