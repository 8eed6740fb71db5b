"""`policyroute diff OLD NEW` or `policyroute diff --git REV [PATH]`: the effective change.

Prints, per route and per key, what a policy change does: added, removed, loosened,
tightened or changed (`diff.py`). Exit 0, or 1 when `--fail-on KIND[,KIND]` names a kind
the diff has (a CI gate: `--fail-on loosened`); 2 on usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..review.diff import (
    FORMATS,
    KINDS,
    DiffError,
    diff_policies,
    git_checkout,
    load_side,
    parse_kinds,
)
from ..review.diff import render as render_diff

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXITS = {
    EXIT_OK: "the diff was printed (and has no kind --fail-on names)",
    EXIT_FAIL: "the diff has a kind --fail-on names, or a policy file is invalid",
    EXIT_USAGE: "a usage error: not OLD and NEW, no such path, a REV git does not know",
}


def _usage(message: str) -> Exception:

    return UsageError(message)


def handler(args: argparse.Namespace) -> int:
    """Run `diff`."""
    try:
        fail_on = parse_kinds(args.fail_on or ())
    except DiffError as exc:
        raise _usage(str(exc)) from None
    with contextlib.ExitStack() as stack:
        if args.git is not None:
            if len(args.sides) > 1:
                raise _usage("with --git REV, give at most one PATH (default: policies)")
            path = args.sides[0] if args.sides else "policies"
            try:
                checkout = stack.enter_context(git_checkout(args.git, path))
            except DiffError as exc:
                raise _usage(str(exc)) from None
            old, new = load_side([checkout.path]), load_side([path])
            diff = diff_policies(old, new)
            for route in diff.routes:  # a removed route lives in the checkout, named by REV
                route.location = checkout.label(route.location)
        else:
            if len(args.sides) != 2:
                raise _usage("give OLD and NEW (files or directories), or --git REV [PATH]")
            missing = [s for s in args.sides if not Path(s).exists()]
            if missing:
                raise _usage(f"no policy file or directory {missing[0]!r}")
            old, new = load_side([args.sides[0]]), load_side([args.sides[1]])
            diff = diff_policies(old, new)
    print(render_diff(diff, args.format))
    return EXIT_FAIL if fail_on and diff.has(fail_on) else EXIT_OK


def add_parser(sub: Any) -> None:
    """Register the `diff` subcommand."""
    p = sub.add_parser(
        "diff",
        help="compare the effective policy of every route between two policy sets",
        exits=EXITS,
    )
    p.add_argument(
        "sides", nargs="*", metavar="PATH",
        help="OLD NEW (policy files or directories); with --git, the PATH to compare",
    )
    p.add_argument(
        "--git", metavar="REV", help="compare PATH at git revision REV with the working tree"
    )
    p.add_argument("--format", choices=FORMATS, default="text", help="how the diff is printed")
    p.add_argument(
        "--fail-on", action="append", metavar="KIND",
        help=f"exit 1 when a change is of this kind ({', '.join(KINDS)}; comma-separated)",
    )
    p.set_defaults(func=handler)
