"""The `policyroute` command: lint, explain, schema, run and the dev helpers."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI

from ..errors import ConfigError, PolicyrouteError

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


class UsageError(PolicyrouteError):
    """The command line is wrong (exit 2)."""


def existing(paths: Sequence[str] | None, default: str = "policies") -> list[str]:
    """The policy paths a command was given (or the default); a usage error names one that
    does not exist."""
    found = list(paths or [default])
    missing = [p for p in found if not Path(p).exists()]
    if missing:
        raise UsageError(f"no policy file or directory {missing[0]!r}")
    return found


def load_app(spec: str) -> FastAPI:
    """Import `MODULE:ATTR` and return the FastAPI app it names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--app takes MODULE:ATTR, got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    # Importing the app runs its `install`; lint and explain must not need live backends.
    previous = os.environ.get("POLICYROUTE_OFFLINE")
    os.environ["POLICYROUTE_OFFLINE"] = "1"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    finally:
        if previous is None:
            del os.environ["POLICYROUTE_OFFLINE"]
        else:
            os.environ["POLICYROUTE_OFFLINE"] = previous
    app = getattr(module, attr, None)
    if not isinstance(app, FastAPI):
        raise UsageError(f"{spec} is not a FastAPI app")
    return app


def _cmd_lint(args: argparse.Namespace) -> int:
    from ..review.lint import RULES, lint, render

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


def _cmd_schema(args: argparse.Namespace) -> int:
    from ..language.schema import schema_text

    text = schema_text()
    if args.output:
        if not Path(args.output).parent.is_dir():
            raise UsageError(f"no directory {str(Path(args.output).parent)!r} for {args.output}")
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


_ROUTE = re.compile(r"^\s*[A-Za-z]+\s+/")


def _cmd_explain(args: argparse.Namespace) -> int:
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


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import run

    return run(args.target, host=args.host, port=args.port, reload=args.reload)


Register = Callable[[Any], None]


def _optional_commands() -> list[Register]:
    """Subcommands that live in their own modules (added as capabilities land)."""
    found: list[Register] = []
    for name in (
        "token",
        "mfa",
        "credits",
        "cache",
        "worker",
        "test",
        "check",
        "diff",
    ):
        try:
            module = importlib.import_module(f"policyroute.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"policyroute.cli.{name}":
                raise
            continue
        found.append(module.add_parser)
    return found


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `policyroute` command."""
    from .. import __version__
    from ..review.lint import FORMATS

    top = argparse.ArgumentParser(prog="policyroute", description=__doc__)
    top.add_argument("--version", action="version", version=f"policyroute {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("lint", help="check policy files (and an app's routes)")
    p.add_argument("paths", nargs="*", help="policy files or directories (default: policies/)")
    p.add_argument("--app", help="MODULE:ATTR of the FastAPI app to check routes against")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("--list-rules", action="store_true", help="print each rule's code and severity")
    p.set_defaults(func=_cmd_lint)

    p = sub.add_parser("explain", help="print each route's compiled chain and merged policy")
    p.add_argument(
        "targets",
        nargs="*",
        metavar="PATH|ROUTE",
        help="policy files or directories (default: policies/), and at most one route to "
        "explain alone, e.g. 'POST /io-job' or 'get /user/42'",
    )
    p.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)  # before PATH was positional
    p.add_argument("--app", help="MODULE:ATTR of an app whose installed engine to explain")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("schema", help="print the JSON Schema of the policy language")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("run", help="serve an app; starts embedded backends when no URLs are set")
    p.add_argument("target", help="MODULE:ATTR of the FastAPI app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--reload", action="store_true", help="reload policies when their files change")
    p.set_defaults(func=_cmd_run)

    for register in _optional_commands():
        register(sub)
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

