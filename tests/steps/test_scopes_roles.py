"""Scopes (all required) and roles (any one), read from configurable claim paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .identity_kit import SETTINGS, bearer, challenge, problem_type, serve, token, write_policies

ROUTES = """\
  POST /io-job:
    scopes: [run:io_jobs, read:data]
  GET /admin:
    roles: [admin, io_job_runner]
"""


def _settings(scopes_claim: str = "scope", roles_claim: str = "roles") -> str:
    return SETTINGS.replace(
        "realm: io\n", f"realm: io\n    scopes_claim: {scopes_claim}\n    roles_claim: {roles_claim}\n")


async def test_every_listed_scope_is_required(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir) as c:
        one = await c.post("/io-job", headers=bearer(token(scopes=["run:io_jobs"])))
        both = await c.post("/io-job", headers=bearer(token(scopes=["run:io_jobs", "read:data"])))
    assert one.status_code == 403
    assert problem_type(one) == "insufficient-scope"
    assert 'scope="run:io_jobs read:data"' in challenge(one)
    assert one.json()["required_scopes"] == ["run:io_jobs", "read:data"]
    assert both.status_code == 200


async def test_any_one_listed_role_suffices(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir) as c:
        none = await c.get("/admin", headers=bearer(token(roles=["viewer"])))
        one = await c.get("/admin", headers=bearer(token(roles=["viewer", "io_job_runner"])))
    assert none.status_code == 403
    assert problem_type(none) == "forbidden-role"
    assert "www-authenticate" not in none.headers
    assert one.status_code == 200
    assert one.json()["roles"] == ["io_job_runner", "viewer"]


async def test_scope_claim_may_be_a_list(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES, _settings(scopes_claim="scp"))
    granted = token(extra={"scp": ["run:io_jobs", "read:data"]})
    async with serve(policy_dir) as c:
        r = await c.post("/io-job", headers=bearer(granted))
    assert r.status_code == 200
    assert r.json()["scopes"] == ["read:data", "run:io_jobs"]


@pytest.mark.parametrize(
    ("scope", "status"),
    [
        ("run:io_jobs read:data", 200),
        ("run:io_jobs  read:data ", 200),  # empty scopes between spaces are nothing
        ("run:io_jobs\tread:data", 403),  # RFC 6749: only %x20 separates scopes
        ("run:io_jobs\nread:data", 403),
        ("run:io_jobs\u00a0read:data", 403),  # no-break space
        ("run:io_jobs\u3000read:data", 403),  # ideographic space
    ],
    ids=["space", "spaces", "tab", "newline", "nbsp", "ideographic"],
)
async def test_the_scope_claim_is_split_on_single_spaces_only(
    policy_dir: Path, scope: str, status: int
) -> None:
    write_policies(policy_dir, ROUTES)
    async with serve(policy_dir) as c:
        r = await c.post("/io-job", headers=bearer(token(extra={"scope": scope})))
    assert r.status_code == status, r.text
    if status == 403:
        assert problem_type(r) == "insufficient-scope"
        assert r.json()["required_scopes"] == ["run:io_jobs", "read:data"]


@pytest.mark.parametrize(
    ("roles_claim", "claims"),
    [
        ("realm_access.roles", {"realm_access": {"roles": ["admin", "offline_access"]}}),  # Keycloak
        ("permissions", {"permissions": ["admin"]}),  # Auth0
        ("role", {"role": "admin"}),  # Supabase: one string is one role
        ("app_metadata.authz.roles", {"app_metadata": {"authz": {"roles": ["admin"]}}}),
    ],
    ids=["keycloak", "auth0", "supabase", "nested"],
)
async def test_roles_come_from_the_configured_claim_path(
    policy_dir: Path, roles_claim: str, claims: dict[str, Any]
) -> None:
    write_policies(policy_dir, ROUTES, _settings(roles_claim=roles_claim))
    async with serve(policy_dir) as c:
        granted = await c.get("/admin", headers=bearer(token(extra=claims)))
        plain = await c.get("/admin", headers=bearer(token(roles=["admin"])))
    assert granted.status_code == 200
    assert "admin" in granted.json()["roles"]
    assert plain.status_code == 403  # the default `roles` claim is not read any more


async def test_a_string_role_claim_is_not_split(policy_dir: Path) -> None:
    write_policies(policy_dir, ROUTES, _settings(roles_claim="role"))
    async with serve(policy_dir) as c:
        r = await c.get("/admin", headers=bearer(token(extra={"role": "admin io_job_runner"})))
    assert r.status_code == 403


async def test_scopes_are_checked_before_roles(policy_dir: Path) -> None:
    routes = "  GET /admin:\n    scopes: [admin:all]\n    roles: [admin]\n"
    write_policies(policy_dir, routes)
    async with serve(policy_dir) as c:
        r = await c.get("/admin", headers=bearer(token()))
    assert problem_type(r) == "insufficient-scope"
