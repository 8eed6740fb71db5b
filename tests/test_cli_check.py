"""`policyroute check`: one request's dry run through the real chain, every decision in order.

Each command starts its own embedded Valkey (a real valkey-server), as a user's run does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from policyroute.cli import main

from .conftest import REPO

EXAMPLES = str(REPO / "examples" / "policies")
RUNNER = json.dumps(
    {"sub": "alice", "scope": "run:io_jobs", "roles": ["io_job_runner"], "amr": ["mfa"]}
)


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    """Run `policyroute check` in-process; exit code, stdout lines, stderr."""
    code = main(["check", *argv])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def steps(lines: list[str]) -> list[tuple[str, str]]:
    """(step, outcome) of each numbered decision line."""
    found = []
    for line in lines:
        head, _, rest = line.strip().partition(". ")
        if head.isdigit():
            step, outcome = rest.split()[:2]
            found.append((step, outcome))
    return found


def test_an_allowed_request_shows_every_step_and_what_it_takes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, lines, _ = check(
        capsys, "POST /io-job", EXAMPLES, "--claims", RUNNER, "--header", 'Idempotency-Key: "k1"',
        "--body", '{"resource_id": "r1"}', "--credits", "3",
    )
    assert code == 0, lines
    line = (Path(EXAMPLES) / "service.yaml").read_text().splitlines().index("  POST /io-job:") + 1
    assert lines[0] == f"POST /io-job -> POST /io-job  ({EXAMPLES}/service.yaml:{line}:3)"
    assert steps(lines) == [
        ("client", "pass"),
        ("ip_allowlist", "pass"),
        ("auth", "pass"),
        ("scopes", "pass"),
        ("roles", "pass"),
        ("mfa", "pass"),
        ("rate_limit", "allowed"),
        ("idempotency", "new"),
        ("credits", "reserved"),
        ("handler", "ran"),
        ("credits", "charged"),
    ]
    assert "subject 'alice' of https://auth.example.com/" in lines[3]
    assert "per-user: took 1, 4 left" in lines[7]
    assert lines[-1] == "result: 200 allowed; charges 1 credit; takes per-user 1"


def test_a_refusal_names_its_step_and_what_was_not_reached(
    capsys: pytest.CaptureFixture[str],
) -> None:
    claims = json.dumps({"sub": "bob", "scope": "run:io_jobs", "roles": ["viewer"]})
    code, lines, _ = check(capsys, "post /io-job", EXAMPLES, "--claims", claims)
    assert code == 1
    assert steps(lines)[-1] == ("roles", "deny")
    assert "403 forbidden-role: the caller has none of the roles this route requires" in lines[-3]
    assert lines[-2].strip() == (
        "not reached: mfa, request, rate_limit, credits, idempotency"
    )
    assert lines[-1] == (
        "result: 403 forbidden-role, refused by roles: the caller has none of the roles "
        "this route requires"
    )


def test_a_concrete_path_resolves_to_its_template(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = check(capsys, "get /user/42", EXAMPLES)
    assert code == 1
    assert lines[0].startswith("GET /user/42 -> GET /user/{user_id}  (")
    assert lines[1] == "  params: user_id=42"
    assert steps(lines) == [("client", "pass"), ("auth", "deny")]
    assert lines[-1] == "result: 401 unauthenticated, refused by auth: a bearer token is required"


def test_repeats_share_state_until_a_limit_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = check(
        capsys, "GET /search?q=disk", EXAMPLES, "--claims", '{"scope": "search"}', "--repeat", "4"
    )
    assert code == 1
    assert lines[1:4] == [f"  request {i}: 200 allowed; takes searches 1" for i in (1, 2, 3)]
    assert steps(lines)[-1] == ("rate_limit", "deny")
    assert lines[-1].startswith("result: 429 rate-limited, refused by rate_limit: limit 'searches'")


def test_a_cached_answer_does_not_run_the_handler(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = check(
        capsys, "GET /user/7", EXAMPLES, "--claims", '{"scope": "read:user"}', "--repeat", "2"
    )
    assert code == 0
    assert ("cache", "hit") in steps(lines) and ("handler", "ran") not in steps(lines)
    assert lines[-1] == "result: 200 allowed; answered without the handler; takes reads 1"


def test_tokens_expired_forged_and_one_time_codes(capsys: pytest.CaptureFixture[str]) -> None:
    user = '{"scope": "read:user"}'
    assert check(capsys, "GET /user/1", EXAMPLES, "--claims", user, "--expired")[1][-1] == (
        "result: 401 invalid-token, refused by auth: the token has expired"
    )
    assert check(capsys, "GET /user/1", EXAMPLES, "--claims", user, "--forged")[1][-1] == (
        "result: 401 invalid-token, refused by auth: the token signature is not valid"
    )
    payout = ["POST /payouts", EXAMPLES, "--claims", '{"scope": "payouts:write"}']
    assert check(capsys, *payout, "--totp", "valid", "--body", '{"amount": 1}')[0] == 0
    code, lines, _ = check(capsys, *payout, "--totp", "wrong")
    assert code == 1 and lines[-1].startswith("result: 401 mfa-invalid, refused by mfa")


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = check(
        capsys, "POST /orders", EXAMPLES, "--claims", '{"scope": "write:orders"}',
        "-H", "Idempotency-Key: o1", "--body", '{"item": "disk", "quantity": 1}',
        "--status", "201", "--format", "json",
    )
    assert code == 0
    result = json.loads("\n".join(lines))
    assert result["route"] == "POST /orders" and result["status"] == 201
    assert result["events"] == ["persistent://public/default/orders"]
    assert [d["step"] for d in result["decisions"]][-1] == "handler"
    assert result["handler_calls"] == 1


def test_an_unknown_route_is_denied_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = check(capsys, "GET /zzz", EXAMPLES)
    assert code == 1
    assert lines == [
        "no route of the policies matches GET /zzz; an app route no policy names "
        "is denied (403 no-policy)"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--claims", "[1]"], "--claims takes a JSON object"),
        (["--claims", "{"], "--claims takes a JSON object"),
        (["--header", "no colon"], "--header takes 'Name: value'"),
        (["--status", "20x"], "--status takes codes like 200"),
    ],
)
def test_usage_errors_exit_two(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = check(capsys, "GET /user/1", EXAMPLES, *argv)
    assert code == 2
    assert message in err


SHADOW_AND_HMAC = """\
version: 1
settings:
  auth:
    issuers:
      - {issuer: https://hmac.example/, audience: api, secret_env: NEVER_SET_IN_TESTS,
         algorithms: [HS256]}
      - {issuer: https://ec.example/, audience: [api, other], jwks: https://ec.example/jwks,
         algorithms: [ES256]}
routes:
  GET /reports/{id}:
    enforce: false
    scopes: [read:reports]
    credits: {cost: 2}
"""


def test_any_issuer_signs_and_shadow_mode_is_shown(
    capsys: pytest.CaptureFixture[str], policy_dir: Path
) -> None:
    (policy_dir / "p.yaml").write_text(SHADOW_AND_HMAC)
    assert "NEVER_SET_IN_TESTS" not in os.environ
    code, lines, _ = check(capsys, "GET /reports/9", str(policy_dir), "--claims", "{}")
    assert code == 0
    # shadow mode: each refusal is shown where it happens, the first one in the result
    assert ("scopes", "shadow-deny") in steps(lines)
    assert ("credits", "shadow_insufficient") in steps(lines)
    assert "subject 'test-user' of https://hmac.example/" in "\n".join(lines)
    assert lines[-1] == "result: 200 allowed; shadow: scopes would refuse (insufficient-scope)"
    code, lines, _ = check(
        capsys, "GET /reports/9", str(policy_dir), "--claims", '{"scope": "read:reports"}',
        "--issuer", "https://ec.example/", "--credits", "5",
    )
    assert code == 0
    assert "subject 'test-user' of https://ec.example/" in "\n".join(lines)
    assert lines[-1] == "result: 200 allowed"
    assert not [k for k in os.environ if k.startswith("POLICYROUTE_TEST_HMAC")]


def test_the_installed_command_runs_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "policyroute.cli", "check", "GET /health", EXAMPLES],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "result: 200 allowed"
