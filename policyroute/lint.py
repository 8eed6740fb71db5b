"""Lint policy files (and optionally an app's routes) into findings; render them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from .binding import Binding, no_policy_finding, unmatched_entries, walk_routes
from .compiler import unenforced
from .errors import ConfigError, Finding
from .loader import PolicySet, RouteEntry, load_policies
from .resilience import lint_findings as resilience_findings

FORMATS = ("text", "json", "sarif", "github")


def app_bindings(app: FastAPI) -> list[Binding]:
    """Every route of an app as gates would bind it: path template and methods."""
    return [b for _, b in walk_routes(app.router.routes) if b is not None]


def _route_findings(policies: PolicySet, app: FastAPI) -> list[Finding]:
    bindings = app_bindings(app)
    findings = [
        no_policy_finding(f"{m} {b.path}") for b in bindings for m in b.unpolicied(policies)
    ]
    findings.extend(
        Finding(
            "unmatched-policy",
            f"policy {entry.key} matches no route of the app (check the method and the path "
            "template)",
            entry.location,
            ("routes", entry.key),
        )
        for entry in unmatched_entries(policies, bindings)
    )
    return findings


def lint(paths: Sequence[str | Path], app: FastAPI | None = None) -> list[Finding]:
    """Every finding for the policy files (and the app, when given)."""
    try:
        policies = load_policies(*paths)
    except ConfigError as exc:
        return list(exc.findings)
    findings: list[Finding] = []
    for entry in policies.routes.values():
        for key in unenforced(entry.policy):
            where = entry.origins[key][-1].location if key in entry.origins else entry.location
            findings.append(
                Finding(
                    "not-enforced",
                    f"{entry.key} sets `{key}`, which this version "
                    "cannot enforce; install would refuse to start",
                    where,
                    ("routes", entry.key, key),
                )
            )
        findings.extend(_policy_rules(entry))
    findings.extend(resilience_findings(policies))
    if app is not None:
        findings.extend(_route_findings(policies, app))
    return findings


def _policy_rules(entry: RouteEntry) -> list[Finding]:
    """Rules beyond the schema: unsafe combinations a reviewer would miss."""
    out: list[Finding] = []
    policy = entry.policy
    cache = policy.cache
    if cache is not None and cache.shared and not policy.public and not cache.acknowledge_shared:
        where = entry.origins["cache"][-1].location if "cache" in entry.origins else entry.location
        out.append(
            Finding(
                "shared-cache-authenticated",
                f"{entry.key} caches one response for every caller of an authenticated route; "
                "one user's data could be served to another. Remove `shared: true`, or set "
                "`acknowledge_shared: true` if the response really is the same for everyone",
                where,
                ("routes", entry.key, "cache", "shared"),
            )
        )
    return out


def render(findings: Sequence[Finding], fmt: str) -> str:
    """Findings as text, json, sarif or github annotations."""
    if fmt == "json":
        return json.dumps([_as_dict(f) for f in findings], indent=2)
    if fmt == "sarif":
        return json.dumps(_sarif(findings), indent=2)
    if fmt == "github":
        return "\n".join(_github(f) for f in findings)
    return "\n".join(str(f) for f in findings)


def _as_dict(f: Finding) -> dict[str, Any]:
    return {
        "file": f.location.file,
        "line": f.location.line,
        "column": f.location.column,
        "severity": f.severity,
        "code": f.code,
        "message": f.message,
        "path": f.dotted_path,
    }


def _github(f: Finding) -> str:
    level = "error" if f.severity == "error" else "warning"
    msg = f.message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return (
        f"::{level} file={f.location.file},line={f.location.line},col={f.location.column},"
        f"title={f.code}::{msg}"
    )


def _sarif(findings: Sequence[Finding]) -> dict[str, Any]:
    rules = sorted({f.code for f in findings})
    results = [
        {
            "ruleId": f.code,
            "level": "error" if f.severity == "error" else "warning",
            "message": {"text": f.message},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": f.location.file},
                        "region": {
                            "startLine": max(f.location.line, 1),
                            "startColumn": max(f.location.column, 1),
                        },
                    }
                }
            ],
        }
        for f in findings
    ]
    return {
        "version": "2.1.0",
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "runs": [
            {
                "tool": {"driver": {"name": "policyroute", "rules": [{"id": r} for r in rules]}},
                "results": results,
            }
        ],
    }
