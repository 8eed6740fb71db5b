"""`policyroute check 'METHOD /path' [PATH...]`: one request's dry run, every step's decision.

The request runs through its route's real compiled chain (`dryrun.py`) on a Valkey the
command starts for itself; the handler is a recorder, so nothing of the app runs. Exit 0
when the chain lets the request on, 1 when a step refuses it (or no policy names the
route: the gate denies it), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..language.loader import load_policies
from ..language.resolve import RouteNotFound
from ..review.dryrun import (
    DEFAULT_CLIENT,
    DryRequest,
    DryResult,
    DryRunError,
    HandlerSpec,
    TokenSpec,
    dry_run,
    embedded_valkey,
)
from ._common import existing

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
EXITS = {
    EXIT_OK: "the chain lets the request on",
    EXIT_REFUSED: "a step refuses it, no policy names the route (the gate denies it), or a "
    "policy file is invalid",
    EXIT_USAGE: "a usage error: no such policy path, a malformed option value",
}


def _usage(message: str) -> Exception:

    return UsageError(message)


def _claims(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        claims = json.loads(text)
    except ValueError as exc:
        raise _usage(f"--claims takes a JSON object: {exc}") from None
    if not isinstance(claims, dict):
        raise _usage("--claims takes a JSON object, e.g. '{\"sub\": \"alice\"}'")
    return claims


def _headers(values: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for raw in values or ():
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise _usage(f"--header takes 'Name: value', got {raw!r}")
        out.append((name.strip(), value.strip()))
    return out


def _body(text: str | None) -> bytes | None:
    if text is None:
        return None
    if text.startswith("@"):
        try:
            return Path(text[1:]).read_bytes()
        except OSError as exc:
            raise _usage(f"--body {text}: {exc.strerror}") from None
    return text.encode()


def _statuses(text: str) -> tuple[int, ...]:
    try:
        found = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise _usage(f"--status takes codes like 200 or 503,200, got {text!r}") from None
    if not all(100 <= s <= 599 for s in found):
        raise _usage(f"--status takes HTTP status codes, got {text!r}")
    return found


def request_of(args: argparse.Namespace) -> DryRequest:
    """The dry-run request the command line describes."""
    claims = _claims(args.claims)
    token = None
    if claims is not None or args.expired or args.forged or args.issuer:
        token = TokenSpec(
            claims=claims or {}, issuer=args.issuer, expired=args.expired, forged=args.forged
        )
    return DryRequest(
        request=args.request,
        token=token,
        headers=_headers(args.header),
        client=args.ip,
        body=_body(args.body),
        content_type=args.content_type,
        credits=args.credits,
        totp=args.totp,
        handler=HandlerSpec(status=_statuses(args.status)),
    )


def render(result: DryResult, earlier: list[DryResult] | None = None) -> str:
    """The decisions of a dry run, one line each, then the outcome."""
    resolved = result.resolved
    chain = result.chain
    lines = [
        f"{resolved.method} {resolved.target} -> {resolved.key}"
        + (f"  ({chain.origin})" if chain.origin else "")
    ]
    if resolved.params:
        lines.append("  params: " + ", ".join(f"{k}={v}" for k, v in resolved.params.items()))
    for i, previous in enumerate(earlier or (), 1):
        lines.append(f"  request {i}: {_outcome(previous)}")
    if earlier:
        lines.append(f"  request {len(earlier) + 1}:")
    width = max([len(d.step) for d in result.decisions] + [12])
    for i, d in enumerate(result.decisions, 1):
        detail = f"  {d.detail}" if d.detail else ""
        lines.append(f"  {i:>2}. {d.step:<{width}}  {d.outcome:<9}{detail}".rstrip())
    ran = {d.step for d in result.decisions}
    parts: list[str] = []
    for step in chain.steps:
        names = [p.name for p in getattr(step, "parts", ())] or [step.name]
        parts.extend(n for n in names if n not in ran and n not in parts)
    if parts and not result.allowed:
        lines.append(f"      not reached: {', '.join(parts)}")
    lines.append(f"result: {_outcome(result)}")
    return "\n".join(lines)


def _outcome(result: DryResult) -> str:
    if not result.allowed:
        detail = f": {result.detail}" if result.detail else ""
        return f"{result.status} {result.reason}, refused by {result.step}{detail}"
    said = [f"{result.status} allowed"]
    if result.calls == 0:
        said.append("answered without the handler")
    if result.charged:
        said.append(f"charges {result.charged} credit" + ("s" if result.charged != 1 else ""))
    if result.limits:
        said.append("takes " + ", ".join(f"{n} {t}" for n, t in result.limits.items()))
    if result.events:
        said.append("publishes to " + ", ".join(result.events))
    for step, reason in result.shadow:
        said.append(f"shadow: {step} would refuse ({reason})")
    return "; ".join(said)


async def _check(args: argparse.Namespace, request: DryRequest, url: str) -> int:
    policies = load_policies(*args.paths)
    async with dry_run(policies, url) as run:
        try:
            run.resolve(request.request)
        except RouteNotFound as exc:
            print(f"{exc}; an app route no policy names is denied (403 no-policy)")
            return EXIT_REFUSED
        await run.fresh()
        results: list[DryResult] = []
        try:
            for _ in range(args.repeat):
                results.append(await run.run(request))
        except DryRunError as exc:
            raise _usage(str(exc)) from None
    last = results[-1]
    if args.format == "json":
        print(json.dumps([r.as_dict() for r in results] if args.repeat > 1 else last.as_dict(),
                         indent=2))
    else:
        print(render(last, results[:-1]))
    return EXIT_OK if last.allowed else EXIT_REFUSED


def handler(args: argparse.Namespace) -> int:
    """Run `check`."""
    args.paths = existing(args.paths)
    request = request_of(args)
    with embedded_valkey() as url:
        return asyncio.run(_check(args, request, url))


def add_parser(sub: Any) -> None:
    """Register the `check` subcommand."""
    p = sub.add_parser(
        "check",
        help="dry-run one request through its route's chain and print every step's decision",
        exits=EXITS,
    )
    p.add_argument("request", help="the request, e.g. 'POST /io-job' or 'get /user/42'")
    p.add_argument("paths", nargs="*", help="policy files or directories (default: policies/)")
    p.add_argument(
        "--claims", metavar="JSON", help="the bearer token's claims (a token is minted for them)"
    )
    p.add_argument("--issuer", help="which configured issuer signs the token (default: first)")
    p.add_argument("--expired", action="store_true", help="mint the token already expired")
    p.add_argument("--forged", action="store_true", help="sign it with a key nobody trusts")
    p.add_argument(
        "--header", "-H", action="append", metavar="'NAME: VALUE'", help="a request header"
    )
    p.add_argument(
        "--ip", default=DEFAULT_CLIENT, help=f"client address (default {DEFAULT_CLIENT})"
    )
    p.add_argument("--body", help="the request body (text, or @FILE)")
    p.add_argument("--content-type", default="application/json", help="of --body")
    p.add_argument("--credits", type=int, help="the caller's credit balance before the request")
    p.add_argument(
        "--totp", choices=("valid", "wrong"), help="send a one-time code (enrolled for the run)"
    )
    p.add_argument(
        "--status", default="200", help="what the stand-in handler answers (503,200: per call)"
    )
    p.add_argument("--repeat", type=int, default=1, help="send the request N times (same state)")
    p.add_argument(
        "--format", choices=("text", "json"), default="text", help="text to read, or JSON"
    )
    p.set_defaults(func=handler)
