"""`policyroute credits grant|show|set SUBJECT [N]`: manage credit balances in Valkey.

SUBJECT is named as the routes name it (`cli_principal`): with several issuers or a
tenant claim in the policy settings, `--issuer` and `--tenant` say whose account it is.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from ..backends.valkey import ValkeyStore
from ..config import Settings
from ..errors import StorageError, UsageError
from ._common import EXIT_OK, EXIT_USAGE
from ._principal import Named, add_arguments, named

EXIT_STORAGE = 1
EXITS = {
    EXIT_OK: "the balance was printed",
    EXIT_STORAGE: "Valkey failed",
    EXIT_USAGE: "a usage error: no amount for grant or set, POLICYROUTE_VALKEY_URL is not "
    "set, the policy set cannot be read, --issuer or --tenant missing or not of the policy "
    "settings",
}


def add_parser(sub: Any) -> None:
    """Register the `credits` subcommand."""
    p = sub.add_parser(
        "credits", help="grant, set or show a subject's credit balance", exits=EXITS
    )
    p.add_argument(
        "action", choices=("grant", "show", "set"),
        help="grant: add AMOUNT credits; set: make AMOUNT the balance; show: print it",
    )
    p.add_argument("subject", help="the token subject (or a client address with --ip)")
    p.add_argument(
        "amount", nargs="?", type=int, help="credits to grant (grant) or the balance (set)"
    )
    p.add_argument("--ip", action="store_true", help="the account of anonymous calls from SUBJECT")
    add_arguments(p)
    p.set_defaults(func=handler)


async def _run(args: argparse.Namespace, store: ValkeyStore, who: Named) -> str:
    from ..admin import credits

    try:
        if args.action == "grant":
            total = await credits.grant(store, who.account, args.amount, ip=args.ip)
            return f"{who.label}: balance {total}"
        if args.action == "set":
            await credits.set_balance(store, who.account, args.amount, ip=args.ip)
        found = await credits.show(store, who.account, ip=args.ip)
        extra = f" (granted {found.granted}, allowance left {found.allowance})"
        held = f", {found.held} reserved by requests in flight" if found.held else ""
        return f"{who.label}: balance {found.total}" + (extra if found.allowance else "") + held
    finally:
        await store.stop()


def _who(args: argparse.Namespace) -> Named:
    """The account SUBJECT names: a client address with --ip, else as the routes name it."""
    if not args.ip:
        return named(args)
    if args.issuer is not None or args.tenant is not None or args.tenant_json is not None:
        raise UsageError("--ip names an anonymous caller's address: drop --issuer and --tenant")
    return Named(args.subject, args.subject)


def handler(args: argparse.Namespace) -> int:
    """Run `credits`; exit 2 on usage errors, 1 when Valkey is unreachable."""
    if args.action in ("grant", "set") and args.amount is None:
        print(f"policyroute: credits {args.action} needs an amount", file=sys.stderr)
        return 2
    config = Settings()
    if not config.valkey_url:
        print("policyroute: set POLICYROUTE_VALKEY_URL to manage credits", file=sys.stderr)
        return 2
    who = _who(args)
    store = ValkeyStore(config.valkey_url, prefix=config.key_prefix, cluster=config.valkey_cluster)
    try:
        print(asyncio.run(_run(args, store, who)))
    except StorageError as exc:
        print(f"policyroute: {exc}", file=sys.stderr)
        return 1
    return 0
