"""`policyroute test [PATH...]`: run the policy test files (`*.test.yaml`) beside the policies.

Exit 0 when every case passes, 1 when one fails or a file is malformed (each reported at
its file:line:col), 2 on usage errors (no such path, no test file found).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..review.policytest import FORMATS, render, run_tests, schema_text, summary

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXITS = {
    EXIT_OK: "every case passed (or --schema printed the schema)",
    EXIT_FAILED: "a case failed, or a test file is malformed (reported at its file:line:col)",
    EXIT_USAGE: "a usage error: no such path, no test file found",
}


def handler(args: argparse.Namespace) -> int:
    """Run `test`."""
    if args.schema:
        sys.stdout.write(schema_text())
        return EXIT_OK
    paths = args.paths or ["policies"]
    report = run_tests(paths)
    if not report.files:
        print(f"policyroute: no *.test.yaml files in {', '.join(paths)}", file=sys.stderr)
        return EXIT_USAGE
    text = render(report, args.format, verbose=args.verbose)
    if text:
        print(text)
    if args.format in ("text", "github"):
        print(summary(report), file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED


def add_parser(sub: Any) -> None:
    """Register the `test` subcommand."""
    p = sub.add_parser(
        "test",
        help="run policy test files (*.test.yaml): requests and their expected outcome",
        exits=EXITS,
    )
    p.add_argument(
        "paths", nargs="*", help="test files or directories of *.test.yaml (default: policies/)"
    )
    p.add_argument(
        "--format", choices=FORMATS, default="text", help="how the results are printed"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    p.add_argument(
        "--schema", action="store_true", help="print the JSON Schema of test files and exit"
    )
    p.set_defaults(func=handler)
