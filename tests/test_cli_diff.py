"""`policyroute diff`: the effective policy of every route, compared and classified."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from policyroute.cli import main

from .conftest import REPO

HEAD = """\
version: 1
settings:
  auth:
    issuers:
      - {issuer: https://auth.example.com/, audience: api, jwks: keys/jwks.json}
  trusted_proxies: [10.0.0.0/8]
"""


def policy(routes: str, extra: str = "") -> str:
    return HEAD + extra + "routes:\n" + routes


def diff(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["diff", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def sides(tmp_path: Path, old: str, new: str) -> tuple[str, str]:
    a, b = tmp_path / "old", tmp_path / "new"
    a.mkdir()
    b.mkdir()
    (a / "p.yaml").write_text(old)
    (b / "p.yaml").write_text(new)
    return str(a), str(b)


# (old route body, new route body, expected (kind, path) pairs): one row per listed kind
CLASSIFIED = [
    ("scope removed", "scopes: [a, b]", "scopes: [a]", [("loosened", "scopes")]),
    ("scope added", "scopes: [a]", "scopes: [a, b]", [("tightened", "scopes")]),
    (
        "limit raised",
        "rate_limit: {name: r, capacity: 5, per: 1m}",
        "rate_limit: {name: r, capacity: 50, per: 1m}",
        [("loosened", "rate_limit[r].capacity"), ("loosened", "rate_limit[r].rate")],
    ),
    (
        "limit lowered",
        "rate_limit: {name: r, capacity: 5, per: 1m}",
        "rate_limit: {name: r, capacity: 5, refill: 1, per: 1m}",
        [("tightened", "rate_limit[r].rate")],
    ),
    (
        "limit window made longer",
        "rate_limit: {name: r, algorithm: sliding_window, capacity: 5, per: 1m}",
        "rate_limit: {name: r, algorithm: sliding_window, capacity: 5, per: 1h}",
        [("tightened", "rate_limit[r].rate")],
    ),
    (
        "limit removed",
        "rate_limit: {name: r, capacity: 5, per: 1m}",
        "scopes: []",
        [("loosened", "rate_limit[r]")],
    ),
    (
        "limit added",
        "scopes: []",
        "rate_limit: {name: r, capacity: 5, per: 1m}",
        [("tightened", "rate_limit[r]")],
    ),
    (
        "limit cost raised",
        "rate_limit: {name: r, capacity: 5, per: 1m}",
        "rate_limit: {name: r, capacity: 5, per: 1m, cost: 2}",
        [("tightened", "rate_limit[r].cost")],
    ),
    ("made public", "scopes: []", "public: true", [("loosened", "public")]),
    ("no longer public", "public: true", "scopes: []", [("tightened", "public")]),
    (
        "cache made shared",
        "cache: {ttl: 30s}",
        "cache: {ttl: 30s, shared: true, acknowledge_shared: true}",
        [("loosened", "cache.shared"), ("changed", "cache.acknowledge_shared")],
    ),
    (
        "cache made private",
        "cache: {ttl: 30s, shared: true, acknowledge_shared: true}",
        "cache: {ttl: 30s, acknowledge_shared: true}",
        [("tightened", "cache.shared")],
    ),
    (
        "cache varies less",
        "cache: {ttl: 30s, vary_claims: [org_id]}",
        "cache: {ttl: 30s}",
        [("loosened", "cache.vary_claims")],
    ),
    ("cache ttl", "cache: {ttl: 30s}", "cache: {ttl: 1h}", [("changed", "cache.ttl")]),
    (
        "allowlist widened",
        "ip_allowlist: [10.1.0.0/16]",
        "ip_allowlist: [10.0.0.0/8]",
        [("loosened", "ip_allowlist")],
    ),
    (
        "allowlist narrowed",
        "ip_allowlist: [10.0.0.0/8]",
        "ip_allowlist: [10.1.0.0/16]",
        [("tightened", "ip_allowlist")],
    ),
    (
        "allowlist regrouped",
        "ip_allowlist: [10.0.0.0/9, 10.128.0.0/9]",
        "ip_allowlist: [10.0.0.0/8]",
        [],
    ),
    ("allowlist removed", "ip_allowlist: [10.0.0.0/8]", "scopes: []",
     [("loosened", "ip_allowlist")]),
    ("allowlist added", "scopes: []", "ip_allowlist: [10.0.0.0/8]",
     [("tightened", "ip_allowlist")]),
    ("mfa dropped", "mfa: required", "scopes: []", [("loosened", "mfa")]),
    ("mfa added", "scopes: []", "mfa: required", [("tightened", "mfa")]),
    (
        "mfa takes another method",
        "mfa: {methods: [totp]}",
        "mfa: {methods: [totp, step_up]}",
        [("loosened", "mfa.methods")],
    ),
    ("credits cheaper", "credits: {cost: 3}", "credits: {cost: 1}",
     [("loosened", "credits.cost")]),
    ("credits dearer", "credits: {cost: 1}", "credits: {cost: 3}",
     [("tightened", "credits.cost")]),
    ("credits dropped", "credits: {cost: 1}", "scopes: []", [("loosened", "credits")]),
    (
        "credits fail open",
        "credits: {cost: 1}",
        "credits: {cost: 1, on_backend_error: open}",
        [("loosened", "credits.on_backend_error")],
    ),
    ("roles: another accepted", "roles: [admin]", "roles: [admin, ops]",
     [("loosened", "roles")]),
    ("roles: one fewer", "roles: [admin, ops]", "roles: [admin]", [("tightened", "roles")]),
    ("roles dropped", "roles: [admin]", "scopes: []", [("loosened", "roles")]),
    ("shadow mode", "scopes: [a]", "scopes: [a]\n    enforce: false",
     [("loosened", "enforce")]),
    (
        "idempotency optional",
        "idempotency: {required: true}",
        "idempotency: {}",
        [("loosened", "idempotency.required")],
    ),
    ("timeout", "timeout: 1s", "timeout: 2s", [("changed", "timeout")]),
    ("retry", "retry: {attempts: 2}\n    idempotency: {}", "retry: {attempts: 3}\n    idempotency: {}",
     [("changed", "retry.attempts")]),
]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [row[1:] for row in CLASSIFIED],
    ids=[row[0] for row in CLASSIFIED],
)
def test_each_kind_of_change_is_classified(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    old: str,
    new: str,
    expected: list[tuple[str, str]],
) -> None:
    a, b = sides(
        tmp_path,
        policy(f"  GET /reports:\n    {old}\n"),
        policy(f"  GET /reports:\n    {new}\n"),
    )
    code, out, _ = diff(capsys, a, b, "--format", "json")
    assert code == 0
    report = json.loads(out)
    found = [(c["kind"], c["path"]) for r in report["routes"] for c in r["changes"]]
    assert found == expected


def test_text_output_per_route_and_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a, b = sides(
        tmp_path,
        policy("  GET /user/{id}:\n    scopes: [read:user]\n  GET /old:\n    public: true\n"),
        policy(
            "  GET /user/{user_id}:\n    scopes: []\n    cache: {ttl: 30s, shared: true, "
            "acknowledge_shared: true}\n  GET /new:\n    scopes: [x]\n"
        ),
    )
    code, out, _ = diff(capsys, a, b)
    assert code == 0
    assert out.splitlines() == [
        f"GET /new  [added]  ({b}/p.yaml:11:3)",
        "  added      route added: bearer token, scopes [x]",
        f"GET /old  [removed]  ({a}/p.yaml:10:3)",
        "  removed    route removed: an app route here is denied (403 no-policy)",
        f"GET /user/{{user_id}}  ({b}/p.yaml:8:3)",  # `{id}` renamed: the same route
        "  loosened   scopes: scope read:user removed",
        "  loosened   cache added (shared by every caller, ttl 30s)",
        "3 route(s) differ: 1 added, 1 removed, 2 loosened, 0 tightened, 0 changed",
    ]


def test_a_profile_change_shows_on_every_route_that_uses_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    profile = "profiles:\n  p:\n    rate_limit: {{name: r, capacity: {n}, per: 1m}}\n"
    routes = "  GET /a:\n    use: [p]\n  GET /b:\n    use: [p]\n  GET /c:\n    scopes: []\n"
    a, b = sides(tmp_path, policy(routes, profile.format(n=5)), policy(routes, profile.format(n=9)))
    code, out, _ = diff(capsys, a, b, "--format", "json")
    report = json.loads(out)
    assert code == 0
    assert [r["route"] for r in report["routes"]] == ["GET /a", "GET /b"]
    assert report["summary"]["loosened"] == 4  # capacity and rate, on each route


def test_moving_keys_between_layers_changes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a, b = sides(
        tmp_path,
        policy("  GET /a:\n    scopes: [x]\n    credits: {cost: 2}\n"),
        policy("  GET /a:\n    use: [paid]\n    scopes: [x]\n",
               "defaults:\n  credits: {cost: 1}\nprofiles:\n  paid:\n    credits: {cost: 2}\n"),
    )
    code, out, _ = diff(capsys, a, b)
    assert (code, out.strip()) == (0, "no change to the effective policy of any route")


def test_settings_changes_reach_every_route(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    old = policy("  GET /a:\n    scopes: [x]\n")
    new = old.replace("[10.0.0.0/8]", "[10.0.0.0/8, 192.168.0.0/16]").replace(
        "audience: api", "audience: [api, admin]"
    )
    code, out, _ = diff(capsys, *sides(tmp_path, old, new))
    assert code == 0
    assert out.splitlines()[:3] == [
        "settings",
        "  loosened   auth.issuers[https://auth.example.com/].audience: audience admin added",
        "  loosened   trusted_proxies widened: now also [192.168.0.0/16]",
    ]


def test_fail_on_loosened(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tight, loose = policy("  GET /a:\n    scopes: [x, y]\n"), policy("  GET /a:\n    scopes: [x]\n")
    a, b = sides(tmp_path, tight, loose)
    assert diff(capsys, a, b, "--fail-on", "loosened")[0] == 1
    assert diff(capsys, b, a, "--fail-on", "loosened")[0] == 0  # the reverse only tightens
    assert diff(capsys, b, a, "--fail-on", "loosened,tightened")[0] == 1
    code, _, err = diff(capsys, a, b, "--fail-on", "looser")
    assert code == 2 and "--fail-on takes added, removed, loosened, tightened, changed" in err


def test_markdown_for_a_pull_request_comment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a, b = sides(
        tmp_path,
        policy("  GET /a:\n    mfa: required\n    scopes: [x]\n"),
        policy("  GET /a:\n    scopes: [x, y]\n"),
    )
    _, out, _ = diff(capsys, a, b, "--format", "markdown")
    assert out.splitlines() == [
        "### Policy diff",
        "",
        "0 added, 0 removed, **1 loosened**, **1 tightened**, 0 changed",
        "",
        "| route | change | key | what |",
        "| --- | --- | --- | --- |",
        "| `GET /a` | tightened | `scopes` | scopes: scope y added |",
        "| `GET /a` | **loosened** | `mfa` | mfa dropped: no second factor |",
    ]


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert diff(capsys, str(tmp_path))[0] == 2
    code, _, err = diff(capsys, str(tmp_path), str(tmp_path / "nope"))
    assert code == 2 and "no policy file or directory" in err


def git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.test", *args],
        cwd=cwd, check=True, capture_output=True,
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_git_revision_against_the_working_tree(tmp_path: Path) -> None:
    repo = tmp_path / "service"
    (repo / "policies").mkdir(parents=True)
    (repo / "keys").mkdir()
    (repo / "policies" / "p.yaml").write_text(
        HEAD.replace("keys/jwks.json", "../keys/jwks.json")
        + "routes:\n  GET /a:\n    scopes: [x]\n    rate_limit: {name: r, capacity: 5, per: 1m}\n"
        "  GET /gone:\n    scopes: [x]\n"
    )
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "policies")
    (repo / "policies" / "p.yaml").write_text(
        HEAD.replace("keys/jwks.json", "../keys/jwks.json")
        + "routes:\n  GET /a:\n    public: true\n    rate_limit: {name: r, capacity: 10, per: 1m}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "policyroute.cli", "diff", "--git", "HEAD"]
    done = subprocess.run(
        [*command, "--fail-on", "loosened"], cwd=repo, env=env, capture_output=True, text=True,
        check=False, timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        "GET /a  (policies/p.yaml:8:3)",
        "  loosened   made public: no token, no defaults",
        "  loosened   scopes: scope x removed",
        "  loosened   rate_limit[r].capacity: 5 -> 10",
        "  loosened   rate_limit[r]: 5 per 1m -> 10 per 1m",
        "GET /gone  [removed]  (HEAD:policies/p.yaml:11:3)",
        "  removed    route removed: an app route here is denied (403 no-policy)",
        "2 route(s) differ: 0 added, 1 removed, 4 loosened, 0 tightened, 0 changed",
    ]
    inside = subprocess.run(  # from inside the policy folder, no --fail-on: exit 0
        [*command, "."], cwd=repo / "policies", env=env, capture_output=True,
        text=True, check=False, timeout=60,
    )
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.splitlines()[0] == "GET /a  (p.yaml:8:3)"
    unknown = subprocess.run(
        [sys.executable, "-m", "policyroute.cli", "diff", "--git", "no-such-rev"],
        cwd=repo, env=env, capture_output=True, text=True, check=False, timeout=60,
    )
    assert unknown.returncode == 2 and "git rev-parse" in unknown.stderr
