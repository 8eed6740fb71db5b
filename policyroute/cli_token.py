"""`policyroute token`: mint a DEV ONLY bearer token with the example's published dev key."""

from __future__ import annotations

import argparse
import sys

from ._types import parse_duration
from .identity.dev import DEV_AUDIENCE, DEV_ISSUER, DEV_PRIVATE_KEY, load_private_key, mint

EXIT_USAGE = 2


def _words(values: list[str] | None) -> list[str]:
    # `--scope "a b" --scope c` and `--scope a --scope b` both work.
    return [word for value in values or () for word in value.split()]


def run_token(args: argparse.Namespace) -> int:
    """Print a signed token for the given subject, scopes and roles."""
    try:
        ttl = parse_duration(args.ttl)
        key = load_private_key(args.key)
    except (OSError, ValueError) as exc:
        print(f"policyroute token: {exc}", file=sys.stderr)
        return EXIT_USAGE
    token = mint(key, args.sub, scopes=_words(args.scope), roles=_words(args.role),
                 amr=_words(args.amr), acr=args.acr, ttl=ttl, issuer=args.iss, audience=args.aud)
    print("DEV ONLY token: signed with a published key; never trust that key in production",
          file=sys.stderr)
    print(token)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the `token` subcommand."""
    p = sub.add_parser("token", help="mint a DEV ONLY bearer token for trying routes locally")
    p.add_argument("--sub", required=True, help="the subject (user id)")
    p.add_argument("--scope", action="append", help="a granted scope (repeatable)")
    p.add_argument("--role", action="append", help="a granted role (repeatable)")
    p.add_argument("--amr", action="append", help="an authentication method, e.g. mfa (step-up)")
    p.add_argument("--acr", help="an authentication context class (step-up)")
    p.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m or 1h (default 1h)")
    p.add_argument("--key", default=str(DEV_PRIVATE_KEY), help="the DEV ONLY private JWK file")
    p.add_argument("--iss", default=DEV_ISSUER, help=f"issuer (default {DEV_ISSUER})")
    p.add_argument("--aud", default=DEV_AUDIENCE, help=f"audience (default {DEV_AUDIENCE})")
    p.set_defaults(func=run_token)
