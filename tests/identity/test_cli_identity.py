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
from policyroute.policy import AuthSettings, Issuer

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
