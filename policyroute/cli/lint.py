"""`policyroute lint [PATH...] [--app MODULE:ATTR] [--format ...]`: findings, exit 1 on errors."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..review.lint import FORMATS, RULES, lint, render
from ._common import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, existing, load_app

EXITS = {
    EXIT_OK: "no error findings (warnings allowed), or the rules were listed",
    EXIT_FINDINGS: "at least one error finding",
    EXIT_USAGE: "a usage error: no such policy path, an --app that cannot be imported",
}


def handler(args: argparse.Namespace) -> int:
    """Run `lint`."""
    if args.list_rules:
        for rule in RULES.values():
            print(f"{rule.code:<28} {rule.severity:<8} {rule.summary}")
        return EXIT_OK
    paths = existing(args.paths)
    app = load_app(args.app) if args.app else None
    findings = lint(paths, app)
    text = render(findings, args.format)
    if text:
        print(text)
    errors = [f for f in findings if f.severity == "error"]
    if args.format == "text":
        print(f"{len(errors)} error(s), {len(findings) - len(errors)} warning(s)", file=sys.stderr)
    return EXIT_FINDINGS if errors else EXIT_OK


def add_parser(sub: Any) -> None:
    """Register the `lint` subcommand."""
    p = sub.add_parser("lint", help="check policy files (and an app's routes)", exits=EXITS)
    p.add_argument("paths", nargs="*", help="policy files or directories (default: policies/)")
    p.add_argument("--app", help="MODULE:ATTR of the FastAPI app to check routes against")
    p.add_argument("--format", choices=FORMATS, default="text", help="how findings are printed")
    p.add_argument("--list-rules", action="store_true", help="print each rule's code and severity")
    p.set_defaults(func=handler)
