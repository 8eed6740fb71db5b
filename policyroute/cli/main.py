"""The `policyroute` command: lint, explain, schema, run and the dev helpers."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

from .._compiled import NATIVE
from .._version import __version__
from ..errors import ConfigError, UsageError
from . import cache, check, credits, diff, explain, lint, mfa, run, schema, test, token, worker
from ._common import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, CommandParser

# Each subcommand's module registers its parser, in the order `--help` lists them.
COMMANDS = (lint, explain, schema, run, token, mfa, credits, cache, worker, test, check, diff)
# What every command's exit code means; each command's `--help` lists its own.
EXITS = {
    EXIT_OK: "the command did what it was asked",
    EXIT_FINDINGS: "the command's check failed (each command says which), or a policy file it "
    "read is invalid: its findings are printed, one per line",
    EXIT_USAGE: "a usage error, said in one line: an unknown option, a missing argument, a "
    "path that does not exist",
    128 + signal.SIGTERM: "ended by SIGTERM, after stopping what the command started "
    "(embedded servers, temporary folders)",
}


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `policyroute` command."""
    top = CommandParser(prog="policyroute", description=__doc__, exits=EXITS)
    how = {"compiled": "compiled", "pure": "from source", "stale": "from source: rebuild"}
    top.add_argument(
        "--version", action="version", version=f"policyroute {__version__} ({how[NATIVE]})"
    )
    sub = top.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return top


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the command as SIGINT does: by unwinding, so embedded servers stop and
    their temporary folders are removed (by default SIGTERM ends the process at once).

    `policyroute run` included: uvicorn restores this handler when it has shut down and
    raises the signal it caught again.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `policyroute` console script."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help and --version
        return int(exc.code or 0)
    with _exit_on_sigterm():
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        code: int = args.func(args)
    except UsageError as exc:
        print(f"policyroute: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FINDINGS
    return code
