"""`policyroute explain [PATH...] [ROUTE] [--app MODULE:ATTR] [--format text|json]`: each
route's chain and merged policy."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from ..errors import UsageError
from ._common import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, existing, load_app

_ROUTE = re.compile(r"^\s*[A-Za-z]+\s+/")

EXITS = {
    EXIT_OK: "the chains were printed",
    EXIT_FINDINGS: "no policy or app route has the route given, or a policy file is invalid",
    EXIT_USAGE: "a usage error: more than one route, no such policy path, an --app that "
    "cannot be imported",
}


def handler(args: argparse.Namespace) -> int:
    """Run `explain`."""
    from ..review.explain import UnknownRouteError, explain, explain_json

    # Positional arguments are paths, as for lint; one of them may be a route ('GET /x').
    routes = [a for a in args.targets if _ROUTE.match(a)]
    if len(routes) > 1:
        raise UsageError(f"explain takes one route, got {', '.join(map(repr, routes))}")
    given = [a for a in args.targets if a not in routes] + list(args.paths or ())
    app = load_app(args.app) if args.app else None
    paths = existing(given) if given or app is None else []
    route = routes[0] if routes else None
    try:
        if args.format == "json":
            print(json.dumps(explain_json(paths, app, route), indent=2))
        else:
            print(explain(paths, app, route))
    except UnknownRouteError as exc:
        print(f"policyroute: {exc}", file=sys.stderr)
        return EXIT_FINDINGS
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Register the `explain` subcommand."""
    p = sub.add_parser(
        "explain", help="print each route's compiled chain and merged policy", exits=EXITS
    )
    p.add_argument(
        "targets",
        nargs="*",
        metavar="PATH|ROUTE",
        help="policy files or directories (default: policies/), and at most one route to "
        "explain alone, e.g. 'POST /io-job' or 'get /user/42'",
    )
    p.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)  # before PATH was positional
    p.add_argument("--app", help="MODULE:ATTR of an app whose installed engine to explain")
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="text to read, or JSON"
    )
    p.set_defaults(func=handler)
