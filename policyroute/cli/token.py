"""`policyroute token`: mint a DEV ONLY bearer token for trying routes locally.

The signing key is `--key`, else the repository's published dev key
(`examples/keys/dev-private-jwk.json`) when run in the repository, else `dev-keys/` in the
working directory, which the first run creates (a new DEV ONLY key pair) and names. The
token's issuer and audience are the first issuer's of the policy set (`--policies`, else
POLICYROUTE_POLICIES, else `policies/` when it holds one), so it is taken by the app
whose policy trusts the key; `--iss` and `--aud` say otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._types import parse_duration
from ..config import Settings
from ..errors import ConfigError
from ..identity.dev import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    DEV_JWKS,
    DEV_PRIVATE_KEY,
    LOCAL_DEV_KEYS,
    LOCAL_WARNING,
    load_private_key,
    mint,
    write_dev_keys,
)
from ..language.loader import load_policies

EXIT_OK, EXIT_USAGE = 0, 2
EXITS = {
    EXIT_OK: "the token was printed",
    EXIT_USAGE: "a usage error: no such key file, a key file that is no private JWK, a --ttl "
    "that is no duration",
}


def _words(values: list[str] | None) -> list[str]:
    # `--scope "a b" --scope c` and `--scope a --scope b` both work.
    return [word for value in values or () for word in value.split()]


def _key_file(given: str | None) -> Path:
    """The private JWK to sign with; creates the local DEV ONLY pair on first use."""
    if given is not None:
        return Path(given)
    if DEV_PRIVATE_KEY.is_file():
        return DEV_PRIVATE_KEY
    local = LOCAL_DEV_KEYS / DEV_PRIVATE_KEY.name
    if not local.is_file():
        private, public = write_dev_keys(LOCAL_DEV_KEYS, LOCAL_WARNING)
        print(
            f"policyroute token: created a DEV ONLY key pair in {LOCAL_DEV_KEYS}/ (once; used "
            "from now on)\n"
            f"  {private} signs tokens: anyone who reads it can; keep it out of version "
            "control\n"
            f"  {public} is what a dev policy trusts: `jwks: ../{public}` in policies/*.yaml\n"
            "  never trust it in production; --key FILE signs with another private JWK",
            file=sys.stderr,
        )
    return local


def _issuer(args: argparse.Namespace) -> tuple[str, str]:
    """Issuer and audience: as given, else the policy set's first issuer, else the dev ones."""
    issuer, audience = args.iss, args.aud
    if issuer is not None and audience is not None:
        return issuer, audience
    paths = [p.strip() for p in args.policies.split(",")] if args.policies else None
    paths = paths or Settings().policy_paths()
    trusted = []
    if all(Path(p).exists() for p in paths):
        try:
            trusted = load_policies(*paths).settings.auth.issuers
        except ConfigError:
            trusted = []  # a broken policy set says so when it is linted or served
    chosen = next((i for i in trusted if issuer in (None, i.issuer)), None)
    if chosen is None:
        return issuer or DEV_ISSUER, audience or DEV_AUDIENCE
    first = chosen.audience if isinstance(chosen.audience, str) else chosen.audience[0]
    return chosen.issuer, audience or first


def run_token(args: argparse.Namespace) -> int:
    """Print a signed token for the given subject, scopes and roles."""
    try:
        ttl = parse_duration(args.ttl)
        file = _key_file(args.key)
        key = load_private_key(file)
    except FileNotFoundError:
        print(f"policyroute token: no key file {args.key!r}; --key takes a private JWK file",
              file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as exc:
        print(f"policyroute token: {exc}", file=sys.stderr)
        return EXIT_USAGE
    issuer, audience = _issuer(args)
    token = mint(key, args.sub, scopes=_words(args.scope), roles=_words(args.role),
                 amr=_words(args.amr), acr=args.acr, ttl=ttl, issuer=issuer, audience=audience)
    print(f"DEV ONLY token: signed with the dev key {file}; never trust that key in production",
          file=sys.stderr)
    print(token)
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the `token` subcommand."""
    p = sub.add_parser(
        "token", help="mint a DEV ONLY bearer token for trying routes locally", exits=EXITS
    )
    p.add_argument("--sub", required=True, help="the subject (user id)")
    p.add_argument("--scope", action="append", help="a granted scope (repeatable)")
    p.add_argument("--role", action="append", help="a granted role (repeatable)")
    p.add_argument("--amr", action="append", help="an authentication method, e.g. mfa (step-up)")
    p.add_argument("--acr", help="an authentication context class (step-up)")
    p.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m or 1h (default 1h)")
    p.add_argument(
        "--key",
        help=f"the DEV ONLY private JWK file (default: {DEV_PRIVATE_KEY} in the repository, "
        f"else {LOCAL_DEV_KEYS / DEV_PRIVATE_KEY.name}, created on first use beside "
        f"{LOCAL_DEV_KEYS / DEV_JWKS.name})",
    )
    p.add_argument(
        "--iss", help=f"issuer (default: the policy's first issuer, else {DEV_ISSUER})"
    )
    p.add_argument(
        "--aud", help=f"audience (default: that issuer's audience, else {DEV_AUDIENCE})"
    )
    p.add_argument("--policies", help="the policy files or directory the issuer is read from, "
                   "comma-separated (default: POLICYROUTE_POLICIES, else policies)")
    p.set_defaults(func=run_token)
