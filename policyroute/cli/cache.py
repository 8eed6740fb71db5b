"""`policyroute cache warm|invalidate`: fill or drop response-cache entries."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from ..errors import StorageError, UsageError
from ._common import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, load_app

EXITS = {
    EXIT_OK: "every path warmed answered 2xx, or the entries were removed",
    EXIT_FINDINGS: "a path warmed did not answer 2xx, or Valkey failed",
    EXIT_USAGE: "a usage error: POLICYROUTE_VALKEY_URL is not set, an --app that cannot be "
    "imported or has no policyroute engine",
}


def add_parser(sub: Any) -> None:
    """Register the `cache` subcommand."""
    p = sub.add_parser(
        "cache", help="warm listed paths or invalidate a route's cache", exits=EXITS
    )
    p.add_argument(
        "action", choices=("warm", "invalidate"),
        help="warm: GET each path through the app; invalidate: remove a route's entries",
    )
    p.add_argument("targets", nargs="+", help="warm: paths to GET; invalidate: 'GET /route'")
    p.add_argument("--app", required=True, help="MODULE:ATTR of the FastAPI app")
    p.add_argument(
        "-H", "--header", action="append", default=[], help="'Name: value' sent when warming"
    )
    p.add_argument("--path", help="invalidate: only this concrete path")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Run `cache`; exit 1 when a path did not answer 2xx or Valkey failed, 2 on usage."""
    from ..admin import cache as cache_api
    from ..config import Settings

    if not Settings().valkey_url:  # the cache lives there, for warm and invalidate alike
        print("policyroute: set POLICYROUTE_VALKEY_URL to manage the cache", file=sys.stderr)
        return 2
    app = load_app(args.app)
    engine = getattr(app.state, "policyroute", None)
    if engine is None:
        raise UsageError(f"{args.app} has no installed policyroute engine")
    try:
        if args.action == "warm":
            headers = dict(_header(h) for h in args.header)
            results = asyncio.run(cache_api.warm(app, args.targets, headers))
            for path, status in results.items():
                print(f"{status} {path}")
            return 0 if all(200 <= s < 300 for s in results.values()) else 1
        store = engine.services.get("valkey")
        if store is None:
            raise UsageError("set POLICYROUTE_VALKEY_URL to invalidate the cache")
        route = " ".join(args.targets)
        removed = asyncio.run(_invalidate(store, route, args.path))
        print(f"{route}: {removed} entries removed")
        return 0
    except StorageError as exc:
        print(f"policyroute: {exc}", file=sys.stderr)
        return 1


async def _invalidate(store: Any, route: str, path: str | None) -> int:
    from ..admin import cache as cache_api

    try:
        return await cache_api.invalidate(store, route, path)
    finally:
        await store.stop()


def _header(text: str) -> tuple[str, str]:
    name, _, value = text.partition(":")
    return name.strip(), value.strip()
