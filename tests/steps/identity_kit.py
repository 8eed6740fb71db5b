"""Shared pieces of the identity step tests: the dev key, policies, an app and its client."""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
from fastapi import Depends, FastAPI
from joserfc.jwk import Key, KeySet, RSAKey

import policyroute
import policyroute.testing
from policyroute.engine.services import default_services
from policyroute.identity.dev import DEV_AUDIENCE, DEV_ISSUER, load_private_key, mint

REPO = Path(__file__).resolve().parents[2]
DEV_JWKS = REPO / "examples" / "keys" / "dev-jwks.json"
DEV_PRIVATE = REPO / "examples" / "keys" / "dev-private-jwk.json"

ISSUER_YAML = f"""\
      - issuer: {DEV_ISSUER}
        audience: {DEV_AUDIENCE}
        jwks: {DEV_JWKS}
        algorithms: [RS256]
"""

SETTINGS = f"""\
settings:
  auth:
    realm: io
    require_typ: at+jwt
    issuers:
{ISSUER_YAML}"""

ServiceFactory = Callable[[Any], Mapping[str, Any]]

# A second trusted issuer (a partner's identity provider) with a key of its own.
PARTNER_ISSUER = "https://partner.example.org/"


@functools.cache
def partner_key() -> Key:
    """The second issuer's signing key (generated once per test session)."""
    return RSAKey.generate_key(2048, parameters={"kid": "partner", "alg": "RS256"})


@functools.cache
def partner_jwks() -> Path:
    """A JWKS file with the second issuer's public key (readable by server processes too)."""
    path = Path(tempfile.mkdtemp(prefix="pr-partner-")) / "partner-jwks.json"
    path.write_text(json.dumps(KeySet([partner_key()]).as_dict(private=False)))
    return path


def partner_issuer_yaml() -> str:
    """The second issuer's entry of `settings.auth.issuers`."""
    return (f"      - issuer: {PARTNER_ISSUER}\n        audience: {DEV_AUDIENCE}\n"
            f"        jwks: {partner_jwks()}\n        algorithms: [RS256]\n")


def two_issuer_settings(auth: str = "") -> str:
    """`SETTINGS` trusting the dev issuer and the partner's; `auth` adds auth keys."""
    return SETTINGS + partner_issuer_yaml() + auth


@functools.cache
def dev_key() -> Key:
    """The example's DEV ONLY signing key."""
    return load_private_key(DEV_PRIVATE)


def token(subject: str = "alice", *, issuer: str = DEV_ISSUER, **claims: Any) -> str:
    """A token of `issuer` (the dev issuer or `PARTNER_ISSUER`); keywords go to `mint`."""
    key = partner_key() if issuer == PARTNER_ISSUER else dev_key()
    return mint(key, subject, issuer=issuer, **claims)


def bearer(value: str) -> dict[str, str]:
    """The Authorization header for a token."""
    return {"Authorization": f"Bearer {value}"}


def subject() -> str:
    """A subject no other test uses (Valkey state is shared by the session)."""
    return f"user-{uuid.uuid4().hex[:12]}"


def write_policies(policy_dir: Path, routes: str, settings: str = SETTINGS) -> Path:
    """Write one policy file with the given settings block and routes block."""
    (policy_dir / "identity.yaml").write_text(f"version: 1\n{settings}routes:\n{routes}")
    return policy_dir


def make_app() -> FastAPI:
    """Handlers that answer with who is calling."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    async def who(principal: policyroute.Principal = Depends(policyroute.principal)) -> dict[str, Any]:
        return {
            "subject": principal.subject,
            "scopes": sorted(principal.scopes),
            "roles": sorted(principal.roles),
            "client": principal.client,
            "issuer": principal.issuer,
            "auth_time": principal.auth_time,
            "acr": principal.acr,
            "amr": sorted(principal.amr),
        }

    for path in ("/me", "/open", "/admin", "/step-up", "/io-job"):
        app.add_api_route(path, who, methods=["GET"])
    app.add_api_route("/io-job", who, methods=["POST"])
    return app


@contextlib.asynccontextmanager
async def serve(policy_dir: Path, *, client: str = "127.0.0.1", valkey_url: str | None = None,
                extra_services: Mapping[str, Any] | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the test app gated by the policies in `policy_dir`."""
    app = make_app()

    def services(engine: Any) -> Mapping[str, Any]:
        return {**default_services(engine), **(extra_services or {})}

    policyroute.install(app, policy_dir, settings=policyroute.Settings(valkey_url=valkey_url),
                        services=services)
    async with policyroute.testing.client(app, client_address=client) as c:
        yield c


def challenge(response: httpx.Response) -> str:
    """The WWW-Authenticate header ('' when absent)."""
    return str(response.headers.get("www-authenticate", ""))


def problem_type(response: httpx.Response) -> str:
    """The problem type slug of a problem+json denial."""
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == response.status_code
    return str(body["type"]).rsplit(":", 1)[-1]
