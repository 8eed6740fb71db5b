"""`policyroute worker MODULE[:ATTR]`: run Pulsar consumers until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
from pathlib import Path
from typing import Any

from ..errors import PolicyrouteError, UsageError
from ._common import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE

DESCRIPTION = """\
Run the Pulsar consumers of a module until SIGINT or SIGTERM, then close cleanly
(handlers in progress finish first, at most --grace seconds).

TARGET is MODULE:ATTR, where ATTR names a policyroute.Worker (its @worker.consumer
handlers run), or MODULE alone, which runs every handler the module registered with
@policyroute.consumer (the default registry, policyroute.consumers). The broker is
--pulsar-url or POLICYROUTE_PULSAR_URL.

A failing handler's message is redelivered after its retry_delay and, after
max_redeliveries, moved to its dlq topic. Handlers with resilience="profile" read the
profile from the installed policies: the module must import the app that calls
policyroute.install.
"""
EXITS = {
    EXIT_OK: "the consumers stopped cleanly on SIGINT or SIGTERM",
    EXIT_FINDINGS: "the broker refused the subscriptions",
    EXIT_USAGE: "a usage error: TARGET cannot be imported, is no Worker or has no consumers; "
    "no broker URL",
}


def add_parser(sub: Any) -> None:
    """Register the `worker` subcommand."""
    p = sub.add_parser(
        "worker",
        help="run a module's Pulsar consumers until SIGINT/SIGTERM",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        exits=EXITS,
    )
    p.add_argument("target", help="MODULE:ATTR of a policyroute.Worker, or MODULE")
    p.add_argument("--pulsar-url", help="pulsar:// URL (default: POLICYROUTE_PULSAR_URL)")
    p.add_argument(
        "--grace", type=float, default=10.0, help="seconds handlers may take to finish on stop"
    )
    p.set_defaults(func=handler)


def load_worker(spec: str) -> Any:
    """Import the target and return its Worker."""
    from ..events.consumer import Worker, consumers

    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise UsageError(f"worker takes MODULE or MODULE:ATTR, got {spec!r}")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    worker = getattr(module, attr, None) if attr else consumers
    if not isinstance(worker, Worker):
        raise UsageError(f"{spec} is not a policyroute.Worker")
    if not worker.consumers:
        raise UsageError(f"{spec} has no consumers registered")
    return worker


def handler(args: argparse.Namespace) -> int:
    """Run `worker`; exit 0 after a clean stop, 1 when the broker refused the subscriptions."""
    from ..config import Settings

    worker = load_worker(args.target)
    url = args.pulsar_url or Settings().pulsar_url
    if not url:
        raise UsageError("set POLICYROUTE_PULSAR_URL or pass --pulsar-url")
    try:
        asyncio.run(_serve(worker, url, args.grace))
    except PolicyrouteError as exc:
        print(f"policyroute: {exc}", file=sys.stderr)
        return EXIT_FINDINGS
    return EXIT_OK


async def _serve(worker: Any, url: str, grace: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await worker.start(url)
    names = ", ".join(c.name for c in worker.consumers)
    print(f"policyroute: worker consuming {names}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        print("policyroute: worker stopping", file=sys.stderr, flush=True)
        await worker.stop(grace)
        print("policyroute: worker stopped", file=sys.stderr, flush=True)
