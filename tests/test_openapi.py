"""The OpenAPI document shows each route's bearer scopes and problem responses, and follows reloads."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

import policyroute
from policyroute.crypto import ENV, Keyring

from .conftest import REPO

JWKS = REPO / "examples" / "keys" / "dev-jwks.json"

POLICY = f"""\
version: 1
settings:
  auth:
    issuers:
      - issuer: https://auth.example.com/
        audience: io-api
        jwks: {JWKS}
routes:
  POST /jobs:
    scopes: [run:jobs, read:jobs]
    roles: [runner]
    rate_limit: {{name: per-user, key: user, capacity: 5, refill: 5, per: 1m}}
    credits: {{cost: 2}}
    idempotency: {{required: true}}
    request: {{content_types: [application/json]}}
    breaker: {{failures: 3, reset: 30s}}
    timeout: 5s
  GET /jobs/{{job_id}}:
    scopes: [read:jobs]
    cache: {{ttl: 30s}}
  GET /health:
    public: true
  GET /openapi.json:
    public: true
"""


class Job(BaseModel):
    """A job request."""

    name: str


def make_app() -> FastAPI:
    """Routes with and without policies."""
    app = FastAPI(docs_url=None, redoc_url=None)

    @app.post("/jobs")
    async def create_job(job: Job) -> dict[str, str]:
        return {"name": job.name}

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: int) -> dict[str, int]:
        return {"id": job_id}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/forgotten")
    async def forgotten() -> dict[str, str]:
        return {}

    return app


def installed(policy_dir: Path, valkey_url: str, policy: str = POLICY) -> FastAPI:
    """The app, installed over `policy`."""
    (policy_dir / "routes.yaml").write_text(policy)
    app = make_app()
    settings = policyroute.Settings(valkey_url=valkey_url, key_prefix="t" + uuid.uuid4().hex[:8])
    policyroute.install(app, policy_dir, settings=settings)
    return app


def problem_statuses(operation: dict[str, Any]) -> list[str]:
    """Statuses whose response is a problem document."""
    return sorted(
        code
        for code, response in operation["responses"].items()
        if "application/problem+json" in response.get("content", {})
    )


def test_protected_route_lists_its_scopes_and_every_problem_it_can_answer(
    policy_dir: Path, valkey_url: str
) -> None:
    doc = installed(policy_dir, valkey_url).openapi()
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    post = doc["paths"]["/jobs"]["post"]
    assert post["security"] == [{"bearer": ["run:jobs", "read:jobs"]}]
    assert problem_statuses(post) == [
        "400", "401", "402", "403", "409", "413", "415", "422", "429", "503", "504"
    ]  # fmt: skip
    responses = post["responses"]
    assert "idempotency-response-not-kept" in responses["409"]["description"]
    assert "body-too-large" in responses["413"]["description"]  # idempotency reads the body
    assert "unsupported-media-type" in responses["415"]["description"]
    assert set(responses["401"]["headers"]) == {"WWW-Authenticate"}
    assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(responses["429"]["headers"])
    assert "circuit-open" in responses["503"]["description"]
    assert "backend-unavailable" in responses["503"]["description"]
    # FastAPI's own validation error stays beside the idempotency problem.
    assert set(responses["422"]["content"]) == {"application/json", "application/problem+json"}
    assert "idempotency-key-reused" in responses["422"]["description"]
    ref = responses["402"]["content"]["application/problem+json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/Problem"
    [header] = [p for p in post["parameters"] if p["in"] == "header"]
    assert (header["name"], header["required"]) == ("idempotency-key", True)
    assert post["x-policyroute"]["credits"] == 2 and post["x-policyroute"]["roles"] == ["runner"]


def test_each_token_bucket_limit_shows_its_refill(policy_dir: Path, valkey_url: str) -> None:
    """A bucket of 5 refilled by 1 a minute is another limit than one refilled by 5."""
    policy = POLICY.replace("capacity: 5, refill: 5, per: 1m", "capacity: 5, refill: 1, per: 1m")
    policy = policy.replace(
        "    cache: {ttl: 30s}\n",
        "    cache: {ttl: 30s}\n    rate_limit: {name: reads, key: user, capacity: 60, per: 1m}\n",
    )
    doc = installed(policy_dir, valkey_url, policy).openapi()
    [post] = doc["paths"]["/jobs"]["post"]["x-policyroute"]["rate_limit"]
    assert post == {"name": "per-user", "key": "user", "algorithm": "token_bucket",
                    "capacity": 5, "refill": 1, "per": "1m"}  # fmt: skip
    [read] = doc["paths"]["/jobs/{job_id}"]["get"]["x-policyroute"]["rate_limit"]
    assert read["refill"] == 60  # unset: the bucket refills whole each `per`


def test_routes_that_read_json_from_the_body_list_invalid_body(
    policy_dir: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, Keyring.generate("k1"))
    health = "  GET /health:\n    public: true\n"
    policy = POLICY.replace(health, health + "    encrypt_fields: [ssn]\n")
    doc = installed(policy_dir, valkey_url, policy).openapi()
    health = doc["paths"]["/health"]["get"]
    assert problem_statuses(health) == ["400", "413"]
    assert "invalid-body" in health["responses"]["400"]["description"]


def test_read_route_and_public_and_unpolicied_routes(policy_dir: Path, valkey_url: str) -> None:
    doc = installed(policy_dir, valkey_url).openapi()
    read = doc["paths"]["/jobs/{job_id}"]["get"]
    assert read["security"] == [{"bearer": ["read:jobs"]}]
    assert problem_statuses(read) == ["400", "401", "403"]
    health = doc["paths"]["/health"]["get"]
    assert "security" not in health and problem_statuses(health) == []
    forgotten = doc["paths"]["/forgotten"]["get"]
    assert problem_statuses(forgotten) == ["403"]
    assert "no-policy" in forgotten["responses"]["403"]["description"]


def test_an_issuer_with_a_jwks_url_adds_keys_unavailable(policy_dir: Path, valkey_url: str) -> None:
    policy = POLICY.replace(f"jwks: {JWKS}", "jwks: https://auth.example.com/jwks.json")
    doc = installed(policy_dir, valkey_url, policy).openapi()
    read = doc["paths"]["/jobs/{job_id}"]["get"]
    assert problem_statuses(read) == ["400", "401", "403", "503"]
    assert "keys-unavailable" in read["responses"]["503"]["description"]
    assert set(read["responses"]["503"]["headers"]) == {"Retry-After"}


def test_lockout_one_time_tokens_throttle_and_debounce_are_documented(
    policy_dir: Path, valkey_url: str
) -> None:
    policy = POLICY.replace(
        "        jwks: " + str(JWKS) + "\n",
        "        jwks: " + str(JWKS) + "\n    lockout: {failures: 5, per: 10m, block: 30m}\n",
    ).replace(
        "    cache: {{ttl: 30s}}\n".replace("{{", "{").replace("}}", "}"),
        "    replay: jti\n"
        "    rate_limit:\n"
        "      - {key: user, algorithm: throttle, capacity: 2, per: 1s, burst: 4}\n"
        "      - {key: user, algorithm: debounce, per: 3s, on_repeat: join}\n",
    )
    doc = installed(policy_dir, valkey_url, policy).openapi()
    read = doc["paths"]["/jobs/{job_id}"]["get"]
    assert problem_statuses(read) == ["400", "401", "403", "429", "503"]
    responses = read["responses"]
    for slug in ("token-replayed", "invalid-token"):
        assert slug in responses["401"]["description"]
    assert "auth-locked" in responses["429"]["description"]
    assert "rate-limited" in responses["429"]["description"]
    assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(responses["429"]["headers"])
    extension = read["x-policyroute"]
    assert extension["lockout"] == {"failures": 5, "per": "10m", "block": "30m"}
    assert extension["replay"] == "jti"
    assert extension["rate_limit"] == [
        {"name": "throttle", "key": "user", "algorithm": "throttle", "capacity": 2, "per": "1s",
         "burst": 4, "max_delay": "2s"},
        {"name": "debounce", "key": "user", "algorithm": "debounce", "per": "3s",
         "on_repeat": "join"},
    ]  # fmt: skip
    # Every route that needs a token can be locked out; a public one cannot.
    post = doc["paths"]["/jobs"]["post"]
    assert "auth-locked" in post["responses"]["429"]["description"]
    health = doc["paths"]["/health"]["get"]
    assert problem_statuses(health) == [] and "lockout" not in health["x-policyroute"]


async def test_the_problem_schema_describes_a_real_denial(
    policy_dir: Path, valkey_url: str
) -> None:
    app = installed(policy_dir, valkey_url)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        doc = (await c.get("/openapi.json")).json()
        denied = await c.post("/jobs", json={"name": "x"})
    assert denied.status_code == 401
    assert denied.headers["content-type"] == "application/problem+json"
    jsonschema.validate(denied.json(), doc["components"]["schemas"]["Problem"])


async def test_the_document_follows_a_reload(policy_dir: Path, valkey_url: str) -> None:
    app = installed(policy_dir, valkey_url)
    engine = app.state.policyroute
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        before = (await c.get("/openapi.json")).json()
        (policy_dir / "routes.yaml").write_text(
            POLICY.replace("    cache: {ttl: 30s}\n", "    credits: {cost: 1}\n").replace(
                "scopes: [read:jobs]\n    credits", "scopes: [read:jobs, audit]\n    credits"
            )
        )
        assert engine.reload() is None
        after = (await c.get("/openapi.json")).json()
    assert before["paths"]["/jobs/{job_id}"]["get"]["security"] == [{"bearer": ["read:jobs"]}]
    read = after["paths"]["/jobs/{job_id}"]["get"]
    assert read["security"] == [{"bearer": ["read:jobs", "audit"]}]
    assert "402" in problem_statuses(read)
