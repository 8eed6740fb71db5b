"""Settings come from the environment with the POLICYROUTE_ prefix."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

import policyroute
from policyroute import ConfigError, Settings


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
