"""`policyroute run`: serve an app with uvicorn, on embedded backends unless URLs are set."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ._common import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE

EXIT_STARTUP = 3  # uvicorn's own, when it cannot import or start the app
EXITS = {
    EXIT_OK: "the server stopped on SIGINT",
    EXIT_FINDINGS: "the app cannot start: its policy findings are printed, one per line",
    EXIT_USAGE: "a usage error: an unknown option, no target",
    EXIT_STARTUP: "uvicorn could not import or start the app (uvicorn's startup failure)",
    128 + signal.SIGTERM: "the server stopped on SIGTERM",
}


def run(target: str, *, host: str, port: int, reload: bool) -> int:
    """Start missing backends, export their URLs, then serve `target` until interrupted."""
    import uvicorn

    from ..backends.embedded import start_pulsar, start_valkey
    from ..config import Settings
    from ..observability.logs import uvicorn_log_config

    with ExitStack() as stack:
        if not os.environ.get("POLICYROUTE_VALKEY_URL"):
            valkey = start_valkey()
            stack.callback(valkey.stop)
            os.environ["POLICYROUTE_VALKEY_URL"] = valkey.url
            print(f"policyroute: embedded Valkey at {valkey.url}", file=sys.stderr)
        if not os.environ.get("POLICYROUTE_PULSAR_URL"):
            broker = start_pulsar()
            stack.callback(broker.stop)
            os.environ["POLICYROUTE_PULSAR_URL"] = broker.url
            print(
                f"policyroute: embedded Pulsar-compatible broker at {broker.url} "
                f"(metrics at {broker.metrics_url})",
                file=sys.stderr,
            )
        if reload:
            os.environ["POLICYROUTE_RELOAD"] = "1"
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        # Client addresses come from the socket; only `trusted_proxies` in the policy may
        # let a proxy header replace one (uvicorn would trust X-Forwarded-For from loopback).
        # Uvicorn's access and error lines pass the sanitizer too (JSON with LOG_JSON).
        log_config = uvicorn_log_config(json_lines=Settings().log_json)
        uvicorn.run(
            target,
            host=host,
            port=port,
            log_level="info",
            log_config=log_config,
            proxy_headers=False,
        )
    return EXIT_OK


def handler(args: argparse.Namespace) -> int:
    """Run `run`."""
    return run(args.target, host=args.host, port=args.port, reload=args.reload)


def add_parser(sub: Any) -> None:
    """Register the `run` subcommand."""
    p = sub.add_parser(
        "run", help="serve an app; starts embedded backends when no URLs are set", exits=EXITS
    )
    p.add_argument("target", help="MODULE:ATTR of the FastAPI app")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on")
    p.add_argument("--reload", action="store_true", help="reload policies when their files change")
    p.set_defaults(func=handler)
