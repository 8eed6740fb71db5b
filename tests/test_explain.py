"""`policyroute explain`: the chain and the merged policy, each value with file:line:col."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi import FastAPI

import policyroute
from policyroute.cli import main
from policyroute.review.explain import explain

from .conftest import REPO

JWKS = REPO / "examples" / "keys" / "dev-jwks.json"

DEFAULTS = f"""\
version: 1
settings:
  auth:
    issuers:
      - {{issuer: https://auth.example.com/, audience: io-api, jwks: {JWKS}}}
defaults:
  rate_limit: {{name: base, key: user, capacity: 100, refill: 100, per: 1m}}
  cache: {{ttl: 30s}}
  credits: {{cost: 1}}
"""

PROFILES = """\
version: 1
profiles:
  heavy:
    rate_limit:
      - {name: burst, key: user, capacity: 5, refill: 5, per: 1s}
      - name: hourly
        key: user
        capacity: 100
        refill: 100
        per: 1h
resilience:
  upstream:
    retry: {attempts: 3, initial: 50ms}
    timeout: 2s
"""

ROUTES = """\
version: 1
routes:
  GET /reports/{report_id}:
    use: [heavy]
    scopes: [read:reports]
    cache: {vary_headers: [accept]}
    credits: null
    resilience: upstream
  GET /health:
    public: true
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the nth line containing `needle`."""
    return [i for i, line in enumerate(text.splitlines(), 1) if needle in line][nth - 1]


@pytest.fixture
def layered(policy_dir: Path) -> Path:
    """Defaults, profiles and routes in three files."""
    (policy_dir / "a_defaults.yaml").write_text(DEFAULTS)
    (policy_dir / "b_profiles.yaml").write_text(PROFILES)
    (policy_dir / "c_routes.yaml").write_text(ROUTES)
    return policy_dir


def lines_of(text: str) -> dict[str, str]:
    """Effective-policy lines by their stripped `key: value` part."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        head = line.strip().split("   ", 1)[0].removeprefix("- ")
        out.setdefault(head, line)
    return out


def test_each_value_names_its_layer_and_position(layered: Path) -> None:
    text = explain([layered], route="GET /reports/{report_id}")
    lines = lines_of(text)
    defaults, profiles, routes = (layered / n for n in ("a_defaults", "b_profiles", "c_routes"))
    # A mapping merges key by key: ttl from `defaults`, vary_headers from the route.
    ttl = f"{defaults}.yaml:{line_of(DEFAULTS, 'cache:')}:"
    assert lines["ttl: 30s"].endswith("<- defaults at " + ttl + "16")
    vary = f"{routes}.yaml:{line_of(ROUTES, 'vary_headers')}:"
    assert f"<- route at {vary}" in lines["vary_headers: [accept]"]
    assert lines["vary_query: true"].endswith("(built-in default)")
    # A list replaces: both items come from the profile, each at its own line.
    assert "<- profile heavy at" in lines["rate_limit:"]
    assert lines["name: burst"].endswith(f"{profiles}.yaml:{line_of(PROFILES, 'burst')}:16")
    assert lines["name: hourly"].endswith(f"{profiles}.yaml:{line_of(PROFILES, 'hourly')}:15")
    assert lines["per: 1h"].endswith(f"{profiles}.yaml:{line_of(PROFILES, 'per: 1h')}:14")
    assert "base" not in text  # the defaults' list was replaced whole
    # `null` removes an inherited value, and says who removed it.
    credits = lines["credits:"]
    assert f"(removed by route at {routes}.yaml:{line_of(ROUTES, 'credits: null')}:14)" in credits
    # The named resilience profile and where each of its values is written.
    assert f"resilience profile upstream (at {profiles}.yaml:" in text
    assert "<- resilience upstream at" in lines["attempts: 3"]
    assert lines["backoff: exponential"].endswith("(built-in default)")


def test_public_routes_take_no_defaults(layered: Path) -> None:
    text = explain([layered], route="GET /health")
    assert text.startswith("GET /health")
    assert "public: true   <- route at" in text
    assert "cache" not in text and "rate_limit" not in text


async def test_explain_of_an_app_follows_its_reloads(layered: Path, valkey_url: str) -> None:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/reports/{report_id}")
    async def report(report_id: str) -> dict[str, str]:
        return {"id": report_id}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.get("/unlisted")
    async def unlisted() -> dict[str, str]:
        return {}

    settings = policyroute.Settings(valkey_url=valkey_url)
    engine = policyroute.install(app, layered, settings=settings)
    assert "scopes: [read:reports]" in explain([], app, "GET /reports/{report_id}")
    (layered / "c_routes.yaml").write_text(ROUTES.replace("[read:reports]", "[read:all]"))
    assert engine.reload() is None
    text = explain([], app)
    assert "scopes: [read:all]" in text and "read:reports" not in text
    assert "GET /unlisted\n  1. deny" in text


def test_cli_explain_names_an_unknown_route_and_exits_one(
    layered: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", str(layered), "GET /nope"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == "policyroute: no route 'GET /nope' in the policies\n"


IDENTITY = f"""\
version: 1
settings:
  auth:
    tenant_claim: org_id
    issuers:
      - {{issuer: https://auth.example.com/, audience: io-api, jwks: {JWKS}}}
      - {{issuer: https://partner.example.org/, audience: io-api, jwks: {JWKS}}}
routes:
  GET /reports:
    cache: {{ttl: 30s, vary_claims: [team]}}
    rate_limit:
      - {{key: user, capacity: 5, per: 1s}}
      - {{key: "header:x-tenant", capacity: 5, per: 1s}}
"""


def test_explain_says_what_per_principal_state_is_keyed_by(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text(IDENTITY)
    text = explain([policy_dir], route="GET /reports")
    assert "per-principal state keyed by issuer, tenant (org_id), subject" in text
    assert "varies by path, query, claim team" in text
    assert "token bucket of 5 per header:x-tenant (chosen by the client)" in text
    assert "token bucket of 5 per user," in text
    one = IDENTITY.replace("    tenant_claim: org_id\n", "").split("      - {issuer: https://partner")[0]
    (policy_dir / "routes.yaml").write_text(one + "routes:\n  GET /reports:\n    cache: {ttl: 30s}\n")
    assert "per-principal state keyed by subject" in explain([policy_dir], route="GET /reports")


def test_body_limits_show_in_the_chain_and_the_policy(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text(
        "version: 1\nroutes:\n  POST /jobs:\n    public: true\n"
        "    request: {max_body: 64KiB, content_types: [application/json]}\n"
        "    idempotency: {max_body: 2MiB}\n"
        "  POST /notes:\n    public: true\n    idempotency: {}\n"
    )
    jobs = explain([policy_dir], route="POST /jobs")
    assert (
        "request: bodies up to 64KiB (413, checked as they stream); "
        "content types application/json (415)"
    ) in jobs
    assert "responses up to 2MiB replayed, request bodies over 64KiB refused (413)" in jobs
    lines = lines_of(jobs)
    assert "<- route at" in lines["max_body: 64KiB"]
    assert "<- route at" in lines["max_body: 2MiB"]
    # Without `request`, a step that reads the body whole stops at the default (1MiB).
    notes = explain([policy_dir], route="POST /notes")
    assert "request bodies over 1MiB refused (413)" in notes
    assert lines_of(notes)["max_body: 1MiB"].endswith("(built-in default)")

PATTERNS = f"""\
version: 1
settings:
  auth:
    lockout: {{failures: 5, per: 10m, block: 30m}}
    issuers:
      - {{issuer: https://auth.example.com/, audience: io-api, jwks: {JWKS}}}
routes:
  POST /pay:
    replay: jti
    mfa: {{methods: [totp]}}
    rate_limit:
      - {{key: user, algorithm: throttle, capacity: 2, per: 1s, burst: 4, delay: 1}}
      - {{key: user, algorithm: debounce, per: 3s, on_repeat: join}}
  GET /status:
    public: true
    rate_limit: {{key: ip, algorithm: debounce, per: 1s, enforce: false}}
"""


def test_explain_shows_lockout_one_time_tokens_throttle_and_debounce(policy_dir: Path) -> None:
    (policy_dir / "routes.yaml").write_text(PATTERNS)
    text = explain([policy_dir], route="POST /pay")
    steps = [line.split(":")[0].strip() for line in text.splitlines()[1:6]]
    assert steps == ["1. client", "2. auth", "3. mfa", "4. replay", "5. state"]
    assert (
        "lockout after 5 failures in 10m per address, and per subject at the addresses that "
        "failed for it, for 30m" in text
    )
    assert "(a wrong code also counts toward settings.auth.lockout)" in text
    assert "4. replay: a token's jti is accepted once (per issuer, until exp + 30s leeway)" in text
    assert (
        "throttle: throttle to 2 per 1s per user, 4 may wait (1 of them at once), none "
        "longer than 1500ms; past that 429" in text
    )
    assert "debounce: debounce per user and request: a repeat within 3s of the last joins" in text
    public = explain([policy_dir], route="GET /status")
    assert ". auth" not in public.split("effective policy")[0]
    assert "a repeat within 1s of the last is refused (shadow: enforce false)" in public


def test_explain_writes_values_as_a_policy_file_does(policy_dir: Path) -> None:
    """Booleans as YAML writes them, every duration in one spelling (the policy's), and no
    step line that starts or ends on a dangling word."""
    (policy_dir / "routes.yaml").write_text(PATTERNS)
    text = explain([policy_dir])
    assert "True" not in text and "False" not in text
    assert "enforce: true   (built-in default)" in text
    assert re.search(r"\d+\.\d+s\b", text) is None  # no `60.0s`
    assert re.search(r"\b(60|120|300|600|1800|3600|86400)s\b", text) is None  # 1m, 10m, 1d...
    assert "mfa: a TOTP code in x-totp-code, each accepted once" in text  # not "mfa: or TOTP"
    for line in text.splitlines():
        step = re.match(r"\s+\d+\. \w+: (.*)", line)
        if step:
            first, last = step.group(1).split()[0], step.group(1).split()[-1]
            assert first not in ("or", "and", "-", ";"), line
            assert last not in ("or", "and", "-", "of"), line
            assert " -;" not in line and "(0 of them" not in line, line


def test_explain_names_files_relative_to_the_working_directory(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (policy_dir / "routes.yaml").write_text(PATTERNS)
    monkeypatch.chdir(policy_dir.parent)
    assert main(["explain", str(policy_dir.resolve()), "POST /pay"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("POST /pay  (policies/routes.yaml:8:3)")
    assert str(policy_dir.parent) not in out
    assert "<- route at policies/routes.yaml:" in out


def test_explain_of_the_example_app_names_its_files_relative(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert main(["explain", "--app", "examples.app:app", "GET /health"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("GET /health  (examples/policies/service.yaml:")
    assert str(REPO) not in out


def test_explain_json_gives_steps_policy_and_sources(
    policy_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (policy_dir / "routes.yaml").write_text(PATTERNS)
    monkeypatch.chdir(policy_dir.parent)
    assert main(["explain", "policies", "get /status", "--format", "json"]) == 0
    [status] = json.loads(capsys.readouterr().out)
    assert status["route"] == "GET /status"
    assert status["origin"] == f"policies/routes.yaml:{line_of(PATTERNS, 'GET /status')}:3"
    assert status["notes"] == ["public: no authentication"]
    assert [s["name"] for s in status["steps"]] == ["client", "state"]
    assert status["steps"][1]["detail"].startswith("one Valkey round trip: rate_limit(")
    assert status["policy"]["public"] is True
    assert status["policy"]["rate_limit"][0]["per"] == "1s"
    assert status["sources"]["public"].startswith("route at policies/routes.yaml:")
    assert status["sources"]["rate_limit[0].cost"] == "built-in default"
    assert main(["explain", "policies", "GET /nope", "--format", "json"]) == 1


def test_explain_takes_paths_positionally_like_lint(
    layered: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", str(layered)]) == 0
    assert "GET /reports/{report_id}" in capsys.readouterr().out
    assert main(["explain", str(layered / "c_routes.yaml"), str(layered / "a_defaults.yaml"),
                 str(layered / "b_profiles.yaml"), "GET /health"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("GET /health")
    assert main(["explain", str(layered / "missing"), "GET /health"]) == 2
    assert capsys.readouterr().err == (
        f"policyroute: no policy file or directory '{layered / 'missing'}'\n"
    )
    assert main(["explain", str(layered), "GET /health", "GET /x"]) == 2
