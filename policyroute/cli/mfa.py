"""`policyroute mfa enrol|revoke SUBJECT`: TOTP secrets in the Valkey of POLICYROUTE_VALKEY_URL.

SUBJECT is named as the routes name it (`cli_principal`): with several issuers or a
tenant claim in the policy settings, `--issuer` and `--tenant` say whose secret it is.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..backends.valkey import ValkeyStore
from ..config import Settings
from ..errors import StorageError
from ..identity.totp import enrol, revoke
from ._principal import Named, add_arguments, named

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXITS = {
    EXIT_OK: "the secret was enrolled (its URI and secret printed) or revoked",
    EXIT_FAILED: "enrol: the subject has a secret already (see --replace); revoke: it has "
    "none; or Valkey failed",
    EXIT_USAGE: "a usage error: POLICYROUTE_VALKEY_URL is not set, the policy set cannot be "
    "read, --issuer or --tenant missing or not of the policy settings",
}


async def _enrol(store: ValkeyStore, args: argparse.Namespace, who: Named) -> int:
    try:
        found = await enrol(store, who.account, issuer_name=args.issuer_name, digits=args.digits,
                            replace=args.replace, label=args.subject)
    except ValueError:
        print(f"policyroute mfa: {who.label} already has a TOTP secret; revoke it or replace it",
              file=sys.stderr)
        return 1
    print(found.uri)
    print(f"secret: {found.secret}")
    return 0


async def _revoke(store: ValkeyStore, args: argparse.Namespace, who: Named) -> int:
    if await revoke(store, who.account):
        print(f"revoked the TOTP secret of {who.label}")
        return 0
    print(f"{who.label} had no TOTP secret", file=sys.stderr)
    return 1


def run_mfa(args: argparse.Namespace) -> int:
    """Enrol or revoke a subject's TOTP secret."""
    config = Settings()
    if not config.valkey_url:
        print("policyroute: set POLICYROUTE_VALKEY_URL to manage TOTP secrets", file=sys.stderr)
        return EXIT_USAGE
    action = _enrol if args.action == "enrol" else _revoke
    who = named(args)

    async def main() -> int:
        store = ValkeyStore(config.valkey_url or "", prefix=config.key_prefix,
                            cluster=config.valkey_cluster)
        try:
            return await action(store, args, who)
        finally:
            await store.stop()

    try:
        return asyncio.run(main())
    except StorageError as exc:
        print(f"policyroute mfa: {exc}", file=sys.stderr)
        return 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the `mfa` subcommand."""
    p = sub.add_parser(
        "mfa", help="enrol or revoke a subject's TOTP secret (in Valkey)", exits=EXITS
    )
    p.add_argument("action", choices=("enrol", "revoke"),
                   help="enrol: make a secret and print its otpauth:// URI; revoke: delete it")
    p.add_argument("subject", help="the subject (the token's `sub`)")
    p.add_argument("--replace", action="store_true", help="enrol: replace an existing secret")
    p.add_argument("--digits", type=int, choices=(6, 7, 8), default=6,
                   help="enrol: code length (match settings.auth.totp.digits)")
    p.add_argument("--issuer-name", default="policyroute",
                   help="enrol: the label in the authenticator app")
    add_arguments(p)
    p.set_defaults(func=run_mfa)
