"""`policyroute test`: policy test files beside the policies, run as a user runs them.

Every run starts its own embedded Valkey (a real valkey-server); failures are reported at
the test file's line and column, in text, json, github and junit formats.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import jsonschema
import pytest
import yaml

from policyroute.cli import main
from policyroute.review import policytest

from .conftest import REPO

EXAMPLES = REPO / "examples" / "policies"

POLICY = """\
version: 1
settings:
  auth:
    issuers:
      - {issuer: https://auth.example.com/, audience: api, jwks: https://auth.example.com/jwks}
routes:
  GET /reports/{report_id}:
    scopes: [read:reports]
    roles: [analyst]
    rate_limit: {name: reads, key: user, capacity: 2, per: 1m}
    credits: {cost: 3}
  GET /health:
    public: true
"""

TESTS = """\
version: 1
tokens:
  analyst: {claims: {sub: ann, scope: read:reports, roles: [analyst]}}
cases:
  - name: an analyst reads a report
    request: GET /reports/7
    token: analyst
    credits: 5
    expect: {status: 200, charged: 3, limits: {reads: 1}}
  - name: wrong on purpose
    request: get /reports/7
    claims: {sub: bob, scope: read:reports, roles: [intern]}
    expect:
      status: 200
      step: credits
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["test", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def suite(policy_dir: Path) -> Path:
    (policy_dir / "reports.yaml").write_text(POLICY)
    (policy_dir / "reports.test.yaml").write_text(TESTS)
    return policy_dir


def test_the_example_policy_tests_pass() -> None:
    """What `make test` runs: the example's own test file, through the installed command."""
    done = subprocess.run(
        [sys.executable, "-m", "policyroute.cli", "test", "examples/policies"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith("passed, 0 failed (1 file)") and int(last.split()[0]) >= 20


def test_a_failing_case_is_printed_at_its_line_and_column(
    capsys: pytest.CaptureFixture[str], suite: Path
) -> None:
    code, out, err = run(capsys, str(suite))
    assert code == 1
    file = suite / "reports.test.yaml"
    assert out.splitlines() == [
        f"{file}:14:15: error[test-failed] case 'wrong on purpose': status: expected 200, "
        "got 403 (403 forbidden-role from roles: the caller has none of the roles this route "
        "requires)",
        f"{file}:15:13: error[test-failed] case 'wrong on purpose': step: expected credits, "
        "got roles (403 forbidden-role from roles: the caller has none of the roles this "
        "route requires)",
    ]
    assert err.strip() == "1 passed, 1 failed (1 file)"


def test_verbose_lists_passing_cases(capsys: pytest.CaptureFixture[str], suite: Path) -> None:
    _, out, _ = run(capsys, str(suite / "reports.test.yaml"), "-v")
    assert out.splitlines()[0] == f"{suite / 'reports.test.yaml'}:5:5: ok 'an analyst reads a report'"


def test_json_format(capsys: pytest.CaptureFixture[str], suite: Path) -> None:
    code, out, _ = run(capsys, str(suite), "--format", "json")
    assert code == 1
    report = json.loads(out)
    assert report["summary"]["passed"] == 1 and report["summary"]["failed"] == 1
    good, bad = report["cases"]
    assert good["passed"] and good["result"]["charged"] == 3
    assert good["result"]["limits"] == {"reads": 1} and good["result"]["remaining"] == {"reads": 1}
    assert [(f["key"], f["line"], f["column"]) for f in bad["failures"]] == [
        ("status", 14, 15),
        ("step", 15, 13),
    ]
    assert bad["result"]["route"] == "GET /reports/{report_id}"


def test_github_format(capsys: pytest.CaptureFixture[str], suite: Path) -> None:
    _, out, _ = run(capsys, str(suite), "--format", "github")
    first = out.splitlines()[0]
    assert first.startswith(
        f"::error file={suite / 'reports.test.yaml'},line=14,col=15,title=test-failed::"
    )
    assert "case 'wrong on purpose'%3A" not in first  # the message is data, not a property
    assert first.endswith("this route requires)")


def test_junit_format(capsys: pytest.CaptureFixture[str], suite: Path) -> None:
    code, out, _ = run(capsys, str(suite), "--format", "junit")
    assert code == 1
    root = ET.fromstring(out)  # noqa: S314 - our own output
    assert root.attrib["tests"] == "2" and root.attrib["failures"] == "1"
    [case_ok, case_bad] = root.iter("testcase")
    assert case_ok.attrib["name"] == "an analyst reads a report"
    failure = case_bad.find("failure")
    assert failure is not None
    assert failure.text is not None
    assert f"{suite / 'reports.test.yaml'}:14:15: status: expected 200" in failure.text


def _write(policy_dir: Path, text: str) -> Path:
    (policy_dir / "reports.yaml").write_text(POLICY)
    path = policy_dir / "bad.test.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "version: 1\ncases:\n  - request: GET /health\n    expct: {status: 200}\n",
            "4:5: error[unknown-key] unknown key 'expct'",
        ),
        (
            "version: 1\ncases:\n  - request: GET /health\n    expect: {status: ok}\n",
            "4:22: error[invalid-value] Input should be a valid integer, unable to parse string "
            "as an integer",
        ),
        (
            "version: 1\ncases:\n  - request: GET /health\n    expect: {}\n",
            "4:13: error[invalid-value] `expect` names no outcome: give at least `status`",
        ),
        (
            "version: 1\ntokens: {admin: {}}\ncases:\n  - request: GET /health\n"
            "    token: admn\n    expect: {status: 200}\n",
            "5:12: error[unknown-token] no token fixture 'admn'; did you mean 'admin'?",
        ),
        (
            "version: 1\ncases:\n  - request: GET /health\n"
            "    expect: {status: 403, reason: forbiden-role}\n",
            "4:35: error[unknown-reason] no problem type 'forbiden-role'; "
            "did you mean 'forbidden-role'?",
        ),
        (
            "version: 1\ncases:\n  - request: GET /helth\n    expect: {status: 200}\n",
            "3:14: error[no-route] case 'GET /helth': no route of the policies matches "
            "GET /helth; close: GET /health",
        ),
    ],
)
def test_a_malformed_case_is_reported_where_it_is(
    capsys: pytest.CaptureFixture[str], policy_dir: Path, text: str, line: str
) -> None:
    path = _write(policy_dir, text)
    code, out, _ = run(capsys, str(path))
    assert code == 1
    assert f"{path}:{line}" in out.splitlines()


def test_a_broken_policy_is_reported_at_the_policy(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    (policy_dir / "a.yaml").write_text("version: 1\nroutes:\n  GET /x:\n    publc: true\n")
    (policy_dir / "a.test.yaml").write_text(
        "version: 1\ncases:\n  - {request: GET /x, expect: {status: 200}}\n"
    )
    code, out, _ = run(capsys, str(policy_dir))
    assert code == 1
    assert out.startswith(f"{policy_dir / 'a.yaml'}:4:5: error[unknown-key] unknown key 'publc'")


def test_policies_named_by_the_test_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "reports.yaml").write_text(POLICY)
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "health.test.yaml").write_text(
        "version: 1\npolicies: ../policies\ncases:\n"
        "  - {request: GET /health, repeat: 3, expect: {status: 200, ran: true}}\n"
        "  - {request: GET /reports/1, expect: {status: 401, reason: unauthenticated}}\n"
    )
    code, out, err = run(capsys, str(tests))
    assert (code, out) == (0, ""), out
    assert err.strip() == "2 passed, 0 failed (1 file)"


def test_usage_errors_exit_two(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, str(tmp_path / "missing"))
    assert code == 2 and "no test file or directory" in err
    code, _, err = run(capsys, str(tmp_path))
    assert code == 2 and "no *.test.yaml files" in err


def test_the_committed_test_file_schema_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    committed = (REPO / "policies" / "test.schema.json").read_text()
    assert committed == policytest.schema_text(), "run: policyroute test --schema > policies/test.schema.json"
    code, out, _ = run(capsys, "--schema")
    assert code == 0 and out == committed


def test_example_test_files_validate_against_the_schema() -> None:
    files = sorted(REPO.glob("examples/**/*.test.yaml"))
    assert files
    for path in files:
        jsonschema.validate(yaml.safe_load(path.read_text()), policytest.schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "cases": [{"request": "GET /", "expct": {}}]},
                            policytest.schema())
