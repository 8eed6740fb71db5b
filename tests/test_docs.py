"""The documentation site: `make docs` builds it with --strict, and a reader finds what it promises."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import policyroute
from policyroute.cli import main, parser
from policyroute.errors import Problems, ProblemType
from policyroute.language.schema import policy_schema

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "docs" / "_hooks" / "generate.py"
FIRST_CELL = re.compile(r"<tr>\s*<td>(?:<a id=\"[^\"]*\"></a>)?<code>([^<]+)</code>")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as `make docs` builds it (warnings fail the build), into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


def first_cells(html: str) -> set[str]:
    """The code in the first cell of each table row: the keys, rules or types a table lists."""
    return set(FIRST_CELL.findall(html))


def test_the_reference_lists_every_key_of_every_object_of_the_schema(site: Path) -> None:
    schema = policy_schema()
    listed = first_cells(page(site, "reference/policy"))
    route_keys = set(schema["$defs"]["RoutePolicy"]["properties"])
    assert route_keys <= listed
    assert set(schema["properties"]) <= listed
    for name, definition in schema["$defs"].items():
        assert set(definition.get("properties", {})) <= listed, name


def test_the_reference_gives_each_route_key_a_type_default_example_and_description(
    site: Path,
) -> None:
    html = page(site, "reference/policy")
    rows = re.findall(r"<tr>\s*<td><code>(\w+)</code></td>(.*?)</tr>", html, re.DOTALL)
    cells = {key: re.findall(r"<td>(.*?)</td>", rest, re.DOTALL) for key, rest in rows}
    assert "<code>capacity: 5</code>" in html or "<code>capacity: 3</code>" in html
    for key in policy_schema()["$defs"]["RoutePolicy"]["properties"]:
        kind, default, example, description = cells[key]
        assert kind and default and example and description, key


def test_the_lint_rules_page_lists_every_rule_with_its_severity(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lint", "--list-rules"]) == 0
    rules = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    html = page(site, "reference/lint")
    assert rules
    for code, severity in rules:
        assert re.search(rf"<code>{re.escape(code)}</code></td>\s*<td>{severity}</td>", html), code


def test_every_problem_type_is_listed_with_its_status_and_a_page_that_documents_it(
    site: Path,
) -> None:
    html = page(site, "reference/problems")
    problems = [p for p in vars(Problems).values() if isinstance(p, ProblemType)]
    for problem in problems:
        row = re.search(rf"<code>{problem.slug}</code>.*?</tr>", html, re.DOTALL)
        assert row is not None, problem.slug
        assert f"<td>{problem.status}</td>" in row.group(0)
        assert 'href="../../steps/' in row.group(0) or 'href="../../architecture/' in row.group(
            0
        ), problem.slug


def test_the_request_path_page_draws_the_chain_as_a_mermaid_diagram(site: Path) -> None:
    html = page(site, "architecture")
    diagram = re.search(r'<pre class="mermaid"><code>(.*?)</code></pre>', html, re.DOTALL)
    assert diagram is not None
    assert diagram.group(1).startswith("flowchart")
    assert "state" in diagram.group(1) and "resilience" in diagram.group(1)


def test_the_deployment_page_lists_every_setting_and_the_server_flags(site: Path) -> None:
    html = page(site, "deployment")
    for name in policyroute.Settings.model_fields:
        assert f"<code>POLICYROUTE_{name.upper()}</code>" in html, name
    for flag in ("--no-proxy-headers", "--forwarded-allow-ips", "--loop uvloop", "httptools"):
        assert flag in html
    assert "POLICYROUTE_VALKEY_CLUSTER" in html and "pulsar://" in html


def subcommands(top: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, by name."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def test_the_cli_reference_has_every_subcommand_with_its_options_and_exit_codes(
    site: Path,
) -> None:
    html = page(site, "reference/cli")
    commands = subcommands(parser())
    assert len(commands) >= 12
    for name, command in commands.items():
        start = html.find(f'<h2 id="{name}"')
        assert start >= 0, f"policyroute {name} has no section"
        end = html.find("<h2 ", start + 1)
        section = html[start : end if end >= 0 else len(html)]
        assert f"<code>policyroute {name}</code>" in section
        assert f"usage: policyroute {name}" in section
        for action in command._actions:  # all but -h, which every command has
            if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
                for option in action.option_strings:
                    assert option in section, f"policyroute {name} {option}"
        for code in getattr(command, "exits", {}):
            assert f"<td><code>{code}</code></td>" in section, f"policyroute {name}: exit {code}"


def test_there_is_a_page_per_step_with_its_failure_modes(site: Path) -> None:
    for step in (
        "ip_allowlist", "auth", "lockout", "scopes", "roles", "mfa", "request", "replay",
        "rate_limit", "credits", "idempotency", "cache", "fields", "events", "resilience",
    ):  # fmt: skip
        assert 'id="failure-modes"' in page(site, f"steps/{step}"), step


@pytest.fixture(scope="module")
def hook() -> ModuleType:
    """The docs hook module, imported from its file as mkdocs does."""
    spec = importlib.util.spec_from_file_location("policyroute_docs_hook", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def reference_problems(hook: ModuleType, notes: dict[str, Any]) -> list[str]:
    found: list[str] = hook.Reference(policy_schema(), notes).problems()
    return found


def test_the_reference_finds_a_key_without_description_or_a_note_for_no_key(
    hook: ModuleType,
) -> None:
    import yaml

    notes = yaml.safe_load((HOOK.parent / "keys.yaml").read_text(encoding="utf-8"))
    assert reference_problems(hook, notes) == []
    del notes["route.scopes"]
    notes["route.scopez"] = {"description": "a typo"}
    notes["route.enforce"] = {"description": "the schema describes it already"}
    found = reference_problems(hook, notes)
    assert any("'route.scopes' has no description" in f for f in found)
    assert any("'route.scopez' is no key" in f for f in found)
    assert any("'route.enforce' is described by the schema now" in f for f in found)


def test_the_cli_reference_finds_a_subcommand_or_option_without_help(hook: ModuleType) -> None:
    assert hook.Cli(parser()).problems() == []
    top = argparse.ArgumentParser(prog="policyroute")
    sub = top.add_subparsers()
    quiet = sub.add_parser("quiet")
    quiet.add_argument("--loud")
    sub.add_parser("said", help="has help").add_argument("target")
    found = hook.Cli(top).problems()
    assert "policyroute quiet has no help text (add_parser's help=)" in found
    assert "policyroute quiet --loud LOUD has no help text" in found
    assert "policyroute said target has no help text" in found
