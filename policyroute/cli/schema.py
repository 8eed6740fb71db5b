"""`policyroute schema [-o FILE]`: the JSON Schema of the policy language."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ._common import EXIT_OK, EXIT_USAGE

EXITS = {
    EXIT_OK: "the schema was printed or written",
    EXIT_USAGE: "a usage error: the folder of --output does not exist",
}


def handler(args: argparse.Namespace) -> int:
    """Run `schema`."""
    from ..language.schema import schema_text

    text = schema_text()
    if args.output:
        if not Path(args.output).parent.is_dir():
            raise UsageError(f"no directory {str(Path(args.output).parent)!r} for {args.output}")
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Register the `schema` subcommand."""
    p = sub.add_parser("schema", help="print the JSON Schema of the policy language", exits=EXITS)
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=handler)
