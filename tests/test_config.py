"""Settings come from the environment with the POLICYROUTE_ prefix."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI

import policyroute
from policyroute import ConfigError, Settings
from policyroute.crypto import ENV, DataKeyError, Keyring
from policyroute.engine.services import default_services


def test_settings_read_the_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLICYROUTE_VALKEY_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("POLICYROUTE_STRICT", "true")
    monkeypatch.setenv("POLICYROUTE_POLICIES", "a/, b.yaml")
    settings = Settings()
    assert settings.valkey_url == "redis://127.0.0.1:1/0"
    assert settings.strict is True
    assert settings.policy_paths() == ["a/", "b.yaml"]


async def test_install_takes_policies_and_strictness_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, policy_dir: Path
) -> None:
    (policy_dir / "a.yaml").write_text("version: 1\nroutes:\n  GET /ok:\n    public: true\n")
    monkeypatch.setenv("POLICYROUTE_POLICIES", str(policy_dir))
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    policyroute.install(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/ok")).status_code == 200

    monkeypatch.setenv("POLICYROUTE_STRICT", "1")
    strict_app = FastAPI()

    @strict_app.get("/unlisted")
    async def unlisted() -> None:
        return None

    with pytest.raises(ConfigError, match="GET /unlisted has no policy"):
        policyroute.install(strict_app)


def _keyring_of(settings: Settings) -> Keyring | None:
    found = default_services(cast(Any, SimpleNamespace(config=settings))).get("keyring")
    assert found is None or isinstance(found, Keyring)
    return found


def test_data_keys_come_from_the_data_keys_file_when_the_variable_is_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    keys = tmp_path / "data-keys.txt"
    keys.write_text(Keyring.generate("k2") + "," + Keyring.generate("k1") + "\n")
    monkeypatch.setenv("POLICYROUTE_DATA_KEYS_FILE", str(keys))
    assert Settings().data_keys_file == keys
    ring = _keyring_of(Settings())
    assert ring is not None and ring.active == "k2"
    assert ring.open(ring.seal(b"secret")) == b"secret"
    monkeypatch.setenv(ENV, Keyring.generate("env"))  # the variable wins over the file
    ring = _keyring_of(Settings())
    assert ring is not None and ring.active == "env"


def test_a_data_keys_file_is_not_read_offline_and_a_bad_one_names_itself(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    missing = tmp_path / "nowhere.txt"
    ring = _keyring_of(Settings(data_keys_file=missing, offline=True))
    assert ring is not None and ring.active == "offline"  # lint and explain: a throwaway key
    with pytest.raises(DataKeyError, match=r"nowhere\.txt"):
        _keyring_of(Settings(data_keys_file=missing))
    bad = tmp_path / "bad.txt"
    bad.write_text("k1:not base64!")
    with pytest.raises(DataKeyError, match=r"bad\.txt.*not valid base64"):
        _keyring_of(Settings(data_keys_file=bad))
    assert _keyring_of(Settings()) is None  # neither: sealed routes refuse to start
