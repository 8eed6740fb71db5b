"""How `policyroute credits` and `policyroute mfa` name a principal: as the routes do.

The account a principal's state is kept under depends on the policy settings (one issuer
or several, a `tenant_claim` or none; `identity.accounts.Accounts`), so these commands
read the same policy set as the app (`--policies`, else POLICYROUTE_POLICIES) and make
the name with the same function the steps use.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..errors import ConfigError, UsageError
from ..identity.accounts import Accounts
from ..language.loader import load_policies

_UNSET = object()


@dataclass(frozen=True, slots=True)
class Named:
    """A principal named on the command line: its account and how to show it."""

    account: str
    label: str


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say which issuer and tenant a SUBJECT belongs to."""
    p.add_argument("--issuer", help="the issuer of the subject's tokens (needed when the "
                   "policy settings trust several issuers)")
    tenant = p.add_mutually_exclusive_group()
    tenant.add_argument("--tenant", help="the value of settings.auth.tenant_claim in the "
                        "subject's tokens (needed when the settings name a tenant claim)")
    tenant.add_argument("--tenant-json", metavar="JSON", help="--tenant for a value that is "
                        "not a string (42, null for tokens without the claim)")
    p.add_argument("--policies", help="the app's policy files or directory, comma-separated "
                   "(default: POLICYROUTE_POLICIES, else policies)")


def _tenant(args: argparse.Namespace) -> Any:
    if args.tenant is not None:
        return args.tenant
    if args.tenant_json is None:
        return _UNSET
    try:
        return json.loads(args.tenant_json)
    except ValueError:
        raise _usage(f"--tenant-json takes a JSON value, got {args.tenant_json!r}") from None


def _usage(message: str) -> Exception:

    return UsageError(message)


def accounts(args: argparse.Namespace) -> Accounts:
    """The naming rule of the app's policy settings; a usage error when they cannot be read."""
    paths = [p.strip() for p in args.policies.split(",")] if args.policies else None
    paths = paths or Settings().policy_paths()
    try:
        policies = load_policies(*paths)
    except ConfigError as exc:
        first = exc.findings[0].message if exc.findings else str(exc)
        raise _usage(
            f"cannot read the policy set {', '.join(paths)} ({first}); its settings say how "
            "a principal is named (issuers, tenant claim): pass --policies or set "
            "POLICYROUTE_POLICIES to the app's policy files"
        ) from None
    return Accounts(policies.settings.auth)


def named(args: argparse.Namespace) -> Named:
    """The account of `args.subject` as the routes name it, from the policy settings."""
    rule = accounts(args)
    subject: str = args.subject
    tenant = _tenant(args)
    if args.issuer is not None and args.issuer not in rule.issuers:
        trusted = ", ".join(rule.issuers) or "none"
        raise _usage(f"--issuer {args.issuer} is not an issuer of the policy settings "
                     f"(trusted: {trusted})")
    if rule.tenant_claim is None and tenant is not _UNSET:
        raise _usage("the policy settings name no tenant_claim: drop --tenant")
    if not rule.qualified:
        return Named(rule.name(subject, args.issuer), subject)
    issuer = args.issuer
    if issuer is None and len(rule.issuers) > 1:
        raise _usage(f"the policy settings trust several issuers ({', '.join(rule.issuers)}): "
                     "say which one issued the subject's tokens with --issuer")
    if issuer is None and rule.issuers:
        issuer = rule.issuers[0]
    label = subject
    if len(rule.issuers) > 1:
        label += f" of {issuer}"
    if rule.tenant_claim is not None:
        if tenant is _UNSET:
            raise _usage(f"the policy settings key state by tenant ({rule.tenant_claim}): "
                         "give the subject's tenant with --tenant (or --tenant-json null for "
                         "tokens without the claim)")
        label += f" in tenant {json.dumps(tenant)}"
    return Named(rule.name(subject, issuer, tenant), label)
