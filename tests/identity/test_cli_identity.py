"""`policyroute token` mints DEV ONLY tokens; `policyroute mfa` enrols and revokes TOTP secrets."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from policyroute.backends.valkey import ValkeyStore
from policyroute.cli import main
from policyroute.identity.dev import DEV_AUDIENCE, DEV_ISSUER
from policyroute.identity.tokens import Authenticator
from policyroute.language.policy import AuthSettings, Issuer

REPO = Path(__file__).resolve().parents[2]
KEYS = REPO / "examples" / "keys"


async def test_token_mints_a_verifiable_dev_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the default --key is examples/keys/dev-private-jwk.json
    code = main(["token", "--sub", "alice", "--scope", "run:io_jobs", "--scope", "read write",
                 "--role", "io_job_runner", "--amr", "mfa", "--ttl", "15m"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "DEV ONLY" in err
    issuer = Issuer(issuer=DEV_ISSUER, audience=DEV_AUDIENCE, jwks=str(KEYS / "dev-jwks.json"))
    principal = await Authenticator(AuthSettings(issuers=[issuer], require_typ="at+jwt")
                                    ).authenticate(out.strip())
    assert principal.subject == "alice"
    assert principal.scopes == {"run:io_jobs", "read", "write"}
    assert principal.roles == {"io_job_runner"}
    assert principal.amr == {"mfa"}
    assert principal.claims["exp"] - principal.claims["iat"] == 900


@pytest.mark.parametrize("key", ["missing.json", str(KEYS / "dev-jwks.json")])
def test_token_without_a_private_key_is_a_usage_error(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "--sub", "alice", "--key", key]) == 2
    assert "policyroute token:" in capsys.readouterr().err


def test_mfa_enrol_and_revoke(
    valkey_url: str, policy_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    (policy_dir / "routes.yaml").write_text("version: 1\nroutes:\n  GET /x: {public: true}\n")
    monkeypatch.setenv("POLICYROUTE_POLICIES", str(policy_dir))
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", valkey_url)
    who = f"cli-{uuid.uuid4().hex[:8]}"
    monkeypatch.delenv("POLICYROUTE_KEY_PREFIX", raising=False)
    assert main(["mfa", "enrol", who]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"otpauth://totp/policyroute:{who}?secret=")
    # A single-issuer setup keeps the short key: secrets enrolled before stay in use.
    secret = out.split("secret: ")[1].strip()
    assert asyncio.run(_hget(valkey_url, f"pr:{{{who}}}:totp", "secret")) == secret.encode()
    assert main(["mfa", "enrol", who]) == 1  # no silent overwrite
    assert "already has a TOTP secret" in capsys.readouterr().err
    assert main(["mfa", "enrol", who, "--replace"]) == 0
    assert main(["mfa", "revoke", who]) == 0
    assert main(["mfa", "revoke", who]) == 1


async def _hget(url: str, key: str, field: str) -> object:
    store = ValkeyStore(url)
    try:
        return await store.command("HGET", key, field, operation="test")
    finally:
        await store.stop()


def test_mfa_needs_a_valkey_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("POLICYROUTE_VALKEY_URL", raising=False)
    assert main(["mfa", "enrol", "alice"]) == 2
    assert "POLICYROUTE_VALKEY_URL" in capsys.readouterr().err


async def test_token_outside_the_repository_makes_a_dev_key_once_and_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no examples/keys here
    monkeypatch.delenv("POLICYROUTE_POLICIES", raising=False)
    assert main(["token", "--sub", "alice"]) == 0
    first = capsys.readouterr()
    keys = tmp_path / "dev-keys"
    assert "created a DEV ONLY key pair in dev-keys/" in first.err
    assert "dev-keys/dev-private-jwk.json" in first.err and "jwks: ../dev-keys/dev-jwks.json" in first.err
    assert (keys / "dev-private-jwk.json").stat().st_mode & 0o777 == 0o600
    assert "DEV ONLY" in (keys / "README.md").read_text()
    assert "DEV ONLY" in (keys / "dev-jwks.json").read_text()
    assert main(["token", "--sub", "bob"]) == 0
    second = capsys.readouterr()
    assert "created" not in second.err and "DEV ONLY token" in second.err  # made once
    issuer = Issuer(issuer=DEV_ISSUER, audience=DEV_AUDIENCE, jwks=str(keys / "dev-jwks.json"))
    verify = Authenticator(AuthSettings(issuers=[issuer])).authenticate
    assert (await verify(first.out.strip())).subject == "alice"
    assert (await verify(second.out.strip())).subject == "bob"


async def test_token_takes_issuer_and_audience_from_the_policy_it_is_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POLICYROUTE_POLICIES", raising=False)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "api.yaml").write_text(
        "version: 1\nsettings:\n  auth:\n    issuers:\n"
        "      - {issuer: https://dev.local/, audience: items, jwks: ../dev-keys/dev-jwks.json}\n"
        "routes:\n  GET /x: {public: true}\n"
    )
    assert main(["token", "--sub", "alice"]) == 0
    token = capsys.readouterr().out.strip()
    issuer = Issuer(issuer="https://dev.local/", audience="items",
                    jwks=str(tmp_path / "dev-keys" / "dev-jwks.json"))
    principal = await Authenticator(AuthSettings(issuers=[issuer])).authenticate(token)
    assert (principal.claims["iss"], principal.claims["aud"]) == ("https://dev.local/", "items")


def test_token_with_a_missing_key_names_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["token", "--sub", "alice", "--key", "mine.json"]) == 2
    assert capsys.readouterr().err == (
        "policyroute token: no key file 'mine.json'; --key takes a private JWK file\n"
    )
    assert not (tmp_path / "dev-keys").exists()  # --key given: nothing is made
