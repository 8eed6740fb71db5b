"""`policyroute credits grant|show|set SUBJECT [N]`: manage credit balances in Valkey."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from .backends.valkey import ValkeyStore
from .config import Settings
from .errors import StorageError


def add_parser(sub: Any) -> None:
    """Register the `credits` subcommand."""
    p = sub.add_parser("credits", help="grant, set or show a subject's credit balance")
    p.add_argument("action", choices=("grant", "show", "set"))
    p.add_argument("subject", help="the token subject (or a client address with --ip)")
    p.add_argument(
        "amount", nargs="?", type=int, help="credits to grant (grant) or the balance (set)"
    )
    p.add_argument("--ip", action="store_true", help="the account of anonymous calls from SUBJECT")
    p.set_defaults(func=handler)


async def _run(args: argparse.Namespace, store: ValkeyStore) -> str:
    from . import credits

    try:
        if args.action == "grant":
            total = await credits.grant(store, args.subject, args.amount, ip=args.ip)
            return f"{args.subject}: balance {total}"
        if args.action == "set":
            await credits.set_balance(store, args.subject, args.amount, ip=args.ip)
        found = await credits.show(store, args.subject, ip=args.ip)
        extra = f" (granted {found.granted}, allowance left {found.allowance})"
        held = f", {found.held} reserved by requests in flight" if found.held else ""
        return f"{args.subject}: balance {found.total}" + (extra if found.allowance else "") + held
    finally:
        await store.stop()


def handler(args: argparse.Namespace) -> int:
    """Run `credits`; exit 2 on usage errors, 1 when Valkey is unreachable."""
    if args.action in ("grant", "set") and args.amount is None:
        print(f"policyroute: credits {args.action} needs an amount", file=sys.stderr)
        return 2
    config = Settings()
    if not config.valkey_url:
        print("policyroute: set POLICYROUTE_VALKEY_URL to manage credits", file=sys.stderr)
        return 2
    store = ValkeyStore(config.valkey_url, prefix=config.key_prefix, cluster=config.valkey_cluster)
    try:
        print(asyncio.run(_run(args, store)))
    except StorageError as exc:
        print(f"policyroute: {exc}", file=sys.stderr)
        return 1
    return 0
