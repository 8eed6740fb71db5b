"""DEV ONLY: mint bearer tokens from the example's dev key, for trying routes locally.

The example key pair is published in the repository; anyone can sign with it. Never
configure its JWKS in production.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet, RSAKey

DEV_KEYS = Path("examples") / "keys"
DEV_PRIVATE_KEY = DEV_KEYS / "dev-private-jwk.json"
DEV_JWKS = DEV_KEYS / "dev-jwks.json"
# Outside the repository, `policyroute token` makes a DEV ONLY pair of its own here, once.
LOCAL_DEV_KEYS = Path("dev-keys")
DEV_ISSUER = "https://auth.example.com/"
DEV_AUDIENCE = "io-api"
DEV_KID = "dev-only-not-for-production"
WARNING = "DEV ONLY: this key is public in the policyroute repository; never trust it in production"
LOCAL_WARNING = "DEV ONLY: made by `policyroute token` to try an app; never trust it in production"


def load_private_key(path: str | Path = DEV_PRIVATE_KEY) -> Key:
    """The signing key of a JWK file."""
    data = json.loads(Path(path).read_text())
    data.pop("_comment", None)
    try:
        key = RSAKey.import_key(data)
    except JoseError as exc:
        raise ValueError(f"{path} is not an RSA private JWK ({exc.error})") from None
    if not key.is_private:
        raise ValueError(f"{path} holds a public key; minting needs the private JWK")
    return key


def mint(key: Key, subject: str, *, scopes: Iterable[str] = (), roles: Iterable[str] = (),
         amr: Iterable[str] = (), acr: str | None = None, ttl: float = 3600.0,
         issuer: str = DEV_ISSUER, audience: str = DEV_AUDIENCE,
         extra: Mapping[str, Any] | None = None, now: float | None = None) -> str:
    """An RFC 9068 access token (`typ: at+jwt`) signed with RS256 by `key`."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer, "sub": subject, "aud": audience, "client_id": "policyroute-dev",
        "iat": issued, "nbf": issued, "exp": issued + int(ttl), "auth_time": issued,
        "jti": secrets.token_urlsafe(12),
    }
    if scopes:
        claims["scope"] = " ".join(scopes)
    if roles:
        claims["roles"] = list(roles)
    if amr:
        claims["amr"] = list(amr)
    if acr is not None:
        claims["acr"] = acr
    claims.update(extra or {})
    header = {"alg": "RS256", "typ": "at+jwt", "kid": key.kid}
    return jwt.encode(header, claims, key, algorithms=["RS256"])


def write_dev_keys(
    directory: str | Path = DEV_KEYS, comment: str = WARNING
) -> tuple[Path, Path]:
    """Generate a new DEV ONLY RSA key pair: the private JWK, the public JWKS and a README
    that says what they are (`comment` also heads each JSON file)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    key = RSAKey.generate_key(2048, parameters={"kid": DEV_KID, "use": "sig", "alg": "RS256"})
    private = {"_comment": comment, **key.as_dict(private=True)}
    public = {"_comment": comment, **KeySet([key]).as_dict(private=False)}
    private_path, public_path = folder / DEV_PRIVATE_KEY.name, folder / DEV_JWKS.name
    private_path.touch(mode=0o600)  # readable by its owner only, before the key is in it
    private_path.write_text(json.dumps(private, indent=2) + "\n")
    public_path.write_text(json.dumps(public, indent=2) + "\n")
    if comment != WARNING:  # the repository's pair has a README of its own
        (folder / "README.md").write_text(_README.format(comment=comment))
    return private_path, public_path


_README = f"""# DEV ONLY keys, never for production

{{comment}}.

- `{DEV_PRIVATE_KEY.name}`: the private JWK `policyroute token` signs with. Whoever reads
  it can sign tokens that a policy trusting the pair accepts. Keep it out of version control.
- `{DEV_JWKS.name}`: the public JWKS a dev policy trusts with
  `jwks: <path to this file, relative to the policy file>` under `settings.auth.issuers`.

Delete the folder to make a new pair on the next `policyroute token`.
"""
