"""Policy tests: `*.test.yaml` files beside the policies, each case a request and its outcome.

```yaml
version: 1
tokens:                                # named token fixtures (claims are minted, see dryrun)
  runner: {claims: {sub: alice, scope: run:io_jobs, roles: [io_job_runner], amr: [mfa]}}
cases:
  - name: a runner starts a job
    request: POST /io-job               # any case of method; a concrete path
    token: runner                       # or `claims: {...}`, or both (claims win)
    headers: {Idempotency-Key: '"k1"'}
    body: {resource_id: r1}
    credits: 3                          # the caller's balance before the request
    expect: {status: 200, charged: 1, limits: {per-user: 1}}
  - request: GET /user/42
    expect: {status: 401, step: auth, reason: unauthenticated}
```

Each case starts from empty state (Valkey flushed, steps compiled again) unless it says
`continue: true`; `repeat: N` sends the request N times and checks the last answer. The
policies are the test file's directory unless `policies:` names files or directories
(relative to the test file). Every mismatch is reported at the line and column of the
expectation it contradicts; a malformed file at the key that is wrong.
"""

from __future__ import annotations

import asyncio
import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from xml.etree import ElementTree as ET

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .._types import Duration
from ..errors import ConfigError, Finding, Location, Problems, ProblemType, UsageError
from ..language._yaml import Located, load_yaml
from ..language.loader import TEST_SUFFIXES, PolicySet, load_policies
from ..language.resolve import RouteNotFound
from ..observability.metrics import STEP_OF_PROBLEM
from .dryrun import (
    DEFAULT_CLIENT,
    DryRequest,
    DryResult,
    DryRun,
    DryRunError,
    HandlerSpec,
    TokenSpec,
    embedded_valkey,
)

FORMATS = ("text", "json", "github", "junit")
REASONS = sorted(
    {v.slug for v in vars(Problems).values() if isinstance(v, ProblemType)}
)
STEPS = sorted(set(STEP_OF_PROBLEM.values()) | {"cache", "events"})


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=False)


class TokenFixture(_Model):
    """A named token: the claims it carries and how it is signed."""

    claims: dict[str, Any] = Field(
        default_factory=dict,
        description="Claims of the token, over the defaults (iss and aud of the issuer, "
        "sub test-user, iat, nbf, auth_time now, exp in an hour); null removes a default.",
    )
    issuer: str | None = Field(
        default=None, description="Which issuer of settings.auth signs (default: the first)."
    )
    expires_in: Duration = Field(default=3600.0, gt=0, description="Lifetime of the token.")
    expired: bool = Field(default=False, description="Mint the token already expired.")
    forged: bool = Field(default=False, description="Sign it with a key the issuer never had.")


class HandlerReply(_Model):
    """What the recorder standing in for the handler answers."""

    status: int | list[int] = Field(
        default=200, description="A status, or one per call (retries see the next)."
    )
    body: Any = Field(default=None, description="JSON body (default {}).")
    headers: dict[str, str] = Field(default_factory=dict)
    delay: Duration = Field(default=0.0, description="How long each call takes.")


class Expect(_Model):
    """The outcome a case expects; only the keys given are compared."""

    status: int | None = Field(default=None, ge=100, le=599)
    allowed: bool | None = Field(default=None, description="No step refused the request.")
    step: str | None = Field(default=None, description="The step that refused, e.g. roles.")
    reason: str | None = Field(default=None, description="Its problem type, e.g. forbidden-role.")
    charged: int | None = Field(default=None, ge=0, description="Credits the request costs.")
    limits: list[str] | dict[str, int] | None = Field(
        default=None,
        description="The limits the request takes a token from: names, or name: tokens.",
    )
    remaining: dict[str, int] | None = Field(
        default=None, description="What each limit has left after the request (RateLimit)."
    )
    ran: bool | None = Field(default=None, description="Whether the handler was called.")
    cache: Literal["hit", "local_hit", "miss", "wait", "bypass"] | None = None
    idempotency: Literal["new", "replay", "in_flight", "reused"] | None = None
    events: list[str] | None = Field(default=None, description="Topics published to.")
    shadow: str | None = Field(
        default=None, description="The reason a shadowed (enforce: false) step would refuse."
    )
    headers: dict[str, str | None] = Field(
        default_factory=dict, description="Response headers; null: the header is absent."
    )

    @model_validator(mode="after")
    def _something(self) -> Expect:
        if not self.model_fields_set:
            raise ValueError("`expect` names no outcome: give at least `status`")
        return self


class Case(_Model):
    """One request and the outcome it must have."""

    name: str | None = None
    request: str = Field(
        min_length=3, description="METHOD and concrete path, e.g. 'GET /user/42?full=1'."
    )
    token: str | None = Field(default=None, description="A token fixture of `tokens`.")
    claims: dict[str, Any] | None = Field(
        default=None, description="Claims of a token minted for this case (over `token`'s)."
    )
    headers: dict[str, str | int] = Field(default_factory=dict)
    client: str = Field(default=DEFAULT_CLIENT, description="The client (peer) address.")
    body: Any = Field(
        default=None, description="A mapping or list is sent as JSON, a string as text."
    )
    credits: int | None = Field(
        default=None, ge=0, description="The caller's credit balance before the request."
    )
    totp: Literal["valid", "wrong"] | None = Field(
        default=None, description="Send a one-time code (a secret is enrolled for the case)."
    )
    repeat: int = Field(default=1, ge=1, le=10_000, description="Send it N times; check the last.")
    continue_: bool = Field(
        default=False,
        alias="continue",
        description="Keep the state the previous case left (else every case starts empty).",
    )
    handler: HandlerReply = HandlerReply()
    expect: Expect


class TestFile(_Model):
    """A policy test file (`*.test.yaml`)."""

    __test__ = False  # not a pytest class

    version: Literal[1]
    policies: Annotated[list[str], Field(min_length=1)] | str | None = Field(
        default=None,
        description="Policy files or directories, relative to this file (default: its folder).",
    )
    tokens: dict[str, TokenFixture] = Field(default_factory=dict)
    cases: list[Case] = Field(min_length=1)


def schema() -> dict[str, Any]:
    """The JSON Schema of policy test files (for editors' YAML language servers)."""
    generated = TestFile.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://policyroute.dev/schema/policy-test-v1.json",
        "title": "policyroute policy tests",
        **generated,
    }


def schema_text() -> str:
    """The schema as committed (`policies/test.schema.json`)."""
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """One expectation a case's outcome contradicts, where the expectation is written."""

    key: str
    expected: Any
    actual: Any
    location: Location
    message: str


@dataclass(slots=True)
class CaseResult:
    """A case: where it is, what it sent, what came back and what did not match."""

    file: str
    name: str
    request: str
    location: Location
    result: DryResult | None = None
    failures: list[Failure] = field(default_factory=list)
    error: Finding | None = None  # the case could not run (no route, a bad fixture)

    @property
    def passed(self) -> bool:
        """No failure and no error."""
        return not self.failures and self.error is None


@dataclass(slots=True)
class Report:
    """Every case of every file, and the findings of files that could not run."""

    cases: list[CaseResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[CaseResult]:
        """The cases that failed or could not run."""
        return [c for c in self.cases if not c.passed]

    @property
    def ok(self) -> bool:
        """Whether everything passed."""
        return not self.failed and not self.findings


# --- reading files ------------------------------------------------------------------------


def find_test_files(paths: Iterable[str | Path]) -> list[Path]:
    """Test files among `paths`: files as given, `*.test.yaml` in directories (sorted)."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found.extend(sorted(q for q in p.iterdir() if q.name.endswith(TEST_SUFFIXES)))
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"no test file or directory {str(p)!r}")
    return found


def _data_path(loc: Sequence[Any], data: Any) -> tuple[str | int, ...]:
    """The part of a pydantic error location that names keys in the data (no union tags)."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        ):
            out.append(part)
            node = node[part]
        elif i == len(loc) - 1 and isinstance(node, dict) and isinstance(part, str):
            out.append(part)  # a missing key
        # anything else is a union member's tag (`int`, `list[str]`): not in the data
    return tuple(out)


def _schema_findings(exc: ValidationError, doc: Located) -> list[Finding]:
    out: list[Finding] = []
    seen: set[tuple[int, int]] = set()
    for error in exc.errors():
        kind = error["type"]
        path = _data_path(error["loc"], doc.data)
        if kind == "extra_forbidden":
            message = f"unknown key {str(path[-1])!r}"
            where = doc.location(path, key=True)
        elif kind == "missing":
            message = f"missing required key {str(error['loc'][-1])!r}"
            where = doc.location(path[:-1] if path else path, key=True)
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            where = doc.location(path)
        if (where.line, where.column) in seen:
            continue
        seen.add((where.line, where.column))
        code = {"extra_forbidden": "unknown-key", "missing": "missing-key"}.get(
            kind, "invalid-value"
        )
        out.append(Finding(code, message, where, path))
    return out


def read_test_file(path: Path) -> tuple[TestFile, Located]:
    """A test file, validated; raise ConfigError with every finding at its position."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [Finding("unreadable", f"cannot read test file: {exc}", Location(str(path)))]
        ) from None
    doc = load_yaml(text, str(path))
    if not isinstance(doc.data, dict):
        raise ConfigError(
            [
                Finding(
                    "wrong-type",
                    "a test file is a mapping with `version: 1` and `cases`",
                    Location(str(path), 1, 1),
                )
            ]
        )
    try:
        model = TestFile.model_validate(doc.data)
    except ValidationError as exc:
        raise ConfigError(_schema_findings(exc, doc)) from None
    findings = _reference_findings(model, doc)
    if findings:
        raise ConfigError(findings)
    return model, doc


def _close(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f" (one of {', '.join(known)})"


def _reference_findings(model: TestFile, doc: Located) -> list[Finding]:
    """Names a case uses that nothing defines: token fixtures, steps, problem types."""
    out: list[Finding] = []
    for i, case in enumerate(model.cases):
        if case.token is not None and case.token not in model.tokens:
            path: tuple[str | int, ...] = ("cases", i, "token")
            known = sorted(model.tokens) or ["(no tokens defined)"]
            out.append(
                Finding(
                    "unknown-token",
                    f"no token fixture {case.token!r}{_close(case.token, known)}",
                    doc.location(path),
                    path,
                )
            )
        expect = case.expect
        if expect.step is not None and expect.step not in STEPS:
            path = ("cases", i, "expect", "step")
            out.append(
                Finding(
                    "unknown-step",
                    f"no step {expect.step!r}{_close(expect.step, STEPS)}",
                    doc.location(path),
                    path,
                )
            )
        if expect.reason is not None and expect.reason not in REASONS:
            path = ("cases", i, "expect", "reason")
            out.append(
                Finding(
                    "unknown-reason",
                    f"no problem type {expect.reason!r}{_close(expect.reason, REASONS)}",
                    doc.location(path),
                    path,
                )
            )
    return out


def policy_paths(model: TestFile, file: Path) -> list[Path]:
    """The policies a test file runs against (relative to the file)."""
    base = file.parent
    if model.policies is None:
        return [base]
    named = [model.policies] if isinstance(model.policies, str) else model.policies
    return [base / p for p in named]


# --- running ------------------------------------------------------------------------------


def _body(case: Case) -> tuple[bytes | None, str | None]:
    if case.body is None:
        return None, None
    if isinstance(case.body, str):
        return case.body.encode(), "text/plain; charset=utf-8"
    return json.dumps(case.body).encode(), "application/json"


def request_of(case: Case, tokens: Mapping[str, TokenFixture]) -> DryRequest:
    """The dry-run request a case describes."""
    token: TokenSpec | None = None
    if case.token is not None or case.claims is not None:
        fixture = tokens.get(case.token) if case.token else None
        base = fixture or TokenFixture()
        token = TokenSpec(
            claims={**base.claims, **(case.claims or {})},
            issuer=base.issuer,
            expires_in=base.expires_in,
            expired=base.expired,
            forged=base.forged,
        )
    body, content_type = _body(case)
    status = case.handler.status
    return DryRequest(
        request=case.request,
        token=token,
        headers=[(k, str(v)) for k, v in case.headers.items()],
        client=case.client,
        body=body,
        content_type=content_type,
        credits=case.credits,
        totp=case.totp,
        handler=HandlerSpec(
            status=tuple(status) if isinstance(status, list) else (status,),
            body=case.handler.body,
            headers=dict(case.handler.headers),
            delay=case.handler.delay,
        ),
    )


def _actual(key: str, result: DryResult, expected: Any) -> Any:
    """The value of an expectation key in a result (shaped like the expectation)."""
    if key == "limits":
        return sorted(result.limits) if isinstance(expected, list) else dict(result.limits)
    if key == "remaining":
        return {name: result.remaining.get(name) for name in expected}
    if key == "ran":
        return result.calls > 0
    if key in ("cache", "idempotency"):
        return result.outcome(key)
    if key == "shadow":
        return result.shadow[0][1] if result.shadow else None
    if key == "events":
        return list(result.events)
    return getattr(result, key)


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def compare(case: Case, index: int, result: DryResult, doc: Located) -> list[Failure]:
    """Every expectation of `case` that `result` contradicts, at its position."""
    out: list[Failure] = []
    expect = case.expect
    base: tuple[str | int, ...] = ("cases", index, "expect")
    outcome = _summary(result)
    for key in expect.model_fields_set:
        expected = getattr(expect, key)
        if key == "headers":
            for name, value in expected.items():
                actual = result.headers.get(name.lower())
                if actual != value:
                    where = doc.location((*base, "headers", name))
                    message = (
                        f"header {name}: expected {_shown(value)}, got {_shown(actual)}"
                        f" ({outcome})"
                    )
                    out.append(Failure(f"headers.{name}", value, actual, where, message))
            continue
        if key == "limits" and isinstance(expected, list):
            expected = sorted(expected)
        actual = _actual(key, result, expected)
        if actual != expected:
            where = doc.location((*base, key))
            message = f"{key}: expected {_shown(expected)}, got {_shown(actual)} ({outcome})"
            out.append(Failure(key, expected, actual, where, message))
    return sorted(out, key=lambda f: (f.location.line, f.location.column))


def _summary(result: DryResult) -> str:
    if result.allowed:
        said = f"{result.status}, allowed"
        if result.charged:
            said += f", charged {result.charged}"
        return said
    detail = f": {result.detail}" if result.detail else ""
    return f"{result.status} {result.reason} from {result.step}{detail}"


async def _run_file(
    file: Path, model: TestFile, doc: Located, run: DryRun, report: Report
) -> None:
    for i, case in enumerate(model.cases):
        name = case.name or case.request
        where = doc.location(("cases", i))
        outcome = CaseResult(str(file), name, case.request, where)
        report.cases.append(outcome)
        try:
            run.resolve(case.request)
        except RouteNotFound as exc:
            path: tuple[str | int, ...] = ("cases", i, "request")
            outcome.error = Finding("no-route", str(exc), doc.location(path), path)
            continue
        try:
            if not case.continue_:
                await run.fresh()
            request = request_of(case, model.tokens)
            result: DryResult | None = None
            for _ in range(case.repeat):
                result = await run.run(request)
        except DryRunError as exc:
            outcome.error = Finding("case-error", str(exc), where, ("cases", i))
            continue
        assert result is not None
        outcome.result = result
        outcome.failures = compare(case, i, result, doc)


async def _run_all(files: Sequence[Path], url: str, report: Report) -> None:
    loaded: dict[tuple[str, ...], PolicySet] = {}
    for file in files:
        report.files.append(str(file))
        try:
            model, doc = read_test_file(file)
            paths = policy_paths(model, file)
            key = tuple(str(p.resolve()) for p in paths)
            policies = loaded.get(key)
            if policies is None:
                policies = loaded[key] = load_policies(*paths)
        except ConfigError as exc:
            report.findings.extend(exc.findings)
            continue
        run = DryRun(policies, url)
        try:
            await _run_file(file, model, doc, run, report)
        finally:
            await run.close()


def run_tests(paths: Sequence[str | Path], valkey_url: str | None = None) -> Report:
    """Run every case of the test files among `paths` (on a Valkey started for the run)."""
    files = find_test_files(paths)
    report = Report()
    if not files:
        return report
    if valkey_url is not None:
        asyncio.run(_run_all(files, valkey_url, report))
        return report
    with embedded_valkey() as url:
        asyncio.run(_run_all(files, url, report))
    return report


# --- output -------------------------------------------------------------------------------


def _failure_lines(case: CaseResult) -> list[tuple[Location, str, str]]:
    """(where, code, message) of each problem of a case."""
    label = f"case {case.name!r}"
    if case.error is not None:
        return [(case.error.location, case.error.code, f"{label}: {case.error.message}")]
    return [(f.location, "test-failed", f"{label}: {f.message}") for f in case.failures]


def _relative(file: str) -> str:
    from .lint import relative

    return relative(file)


def render(report: Report, fmt: str, *, verbose: bool = False) -> str:
    """The report as text, json, github annotations or JUnit XML."""
    if fmt == "json":
        return json.dumps(_as_json(report), indent=2)
    if fmt == "junit":
        return _junit(report)
    lines: list[str] = []
    for finding in report.findings:
        lines.append(_line(finding.location, finding.code, finding.message, fmt))
    for case in report.cases:
        if verbose and case.passed and fmt == "text":
            lines.append(f"{case.location}: ok {case.name!r}")
        for where, code, message in _failure_lines(case):
            lines.append(_line(where, code, message, fmt))
    return "\n".join(lines)


def _line(where: Location, code: str, message: str, fmt: str) -> str:
    if fmt != "github":
        return f"{where}: error[{code}] {message}"
    from .lint import _escape_data, _escape_property

    props = [f"file={_escape_property(_relative(where.file))}"]
    if where.line:
        props += [f"line={where.line}", f"col={max(where.column, 1)}"]
    props.append(f"title={_escape_property(code)}")
    return f"::error {','.join(props)}::{_escape_data(message)}"


def summary(report: Report) -> str:
    """`12 passed, 1 failed (2 files)`."""
    passed = len(report.cases) - len(report.failed)
    errors = f", {len(report.findings)} file error(s)" if report.findings else ""
    files = len(report.files)
    plural = "s" if files != 1 else ""
    return f"{passed} passed, {len(report.failed)} failed{errors} ({files} file{plural})"


def _as_json(report: Report) -> dict[str, Any]:
    cases = []
    for case in report.cases:
        cases.append(
            {
                "file": case.file,
                "line": case.location.line,
                "column": case.location.column,
                "name": case.name,
                "request": case.request,
                "passed": case.passed,
                "failures": [
                    {
                        "key": f.key,
                        "expected": f.expected,
                        "actual": f.actual,
                        "line": f.location.line,
                        "column": f.location.column,
                        "message": f.message,
                    }
                    for f in case.failures
                ],
                "error": (
                    {"code": case.error.code, "message": case.error.message}
                    if case.error
                    else None
                ),
                "result": case.result.as_dict() if case.result else None,
            }
        )
    return {
        "summary": {
            "passed": len(report.cases) - len(report.failed),
            "failed": len(report.failed),
            "file_errors": len(report.findings),
            "files": list(report.files),
        },
        "findings": [
            {
                "file": f.location.file,
                "line": f.location.line,
                "column": f.location.column,
                "code": f.code,
                "message": f.message,
            }
            for f in report.findings
        ],
        "cases": cases,
    }


def _junit(report: Report) -> str:
    root = ET.Element("testsuites", name="policyroute test")
    by_file: dict[str, list[CaseResult]] = {f: [] for f in report.files}
    for case in report.cases:
        by_file.setdefault(case.file, []).append(case)
    errors_of: dict[str, list[Finding]] = {}
    for finding in report.findings:
        errors_of.setdefault(finding.location.file, []).append(finding)
    totals = {"tests": 0, "failures": 0, "errors": 0}
    for file in errors_of:
        by_file.setdefault(file, [])  # a policy file that did not load
    for file, cases in by_file.items():
        name = _relative(file)
        suite = ET.SubElement(root, "testsuite", name=name)
        counts = {"tests": 0, "failures": 0, "errors": 0}
        for case in cases:
            counts["tests"] += 1
            element = ET.SubElement(
                suite,
                "testcase",
                classname=name,
                name=case.name,
                file=name,
                line=str(case.location.line),
            )
            if case.error is not None:
                counts["errors"] += 1
                error = ET.SubElement(
                    element, "error", type=case.error.code, message=case.error.message
                )
                error.text = f"{case.error.location}: {case.error.message}"
            elif case.failures:
                counts["failures"] += 1
                failure = ET.SubElement(
                    element,
                    "failure",
                    type="test-failed",
                    message="; ".join(f.message for f in case.failures),
                )
                failure.text = "\n".join(f"{f.location}: {f.message}" for f in case.failures)
        for finding in errors_of.get(file, []):
            counts["tests"] += 1
            counts["errors"] += 1
            element = ET.SubElement(suite, "testcase", classname=name, name=f"({finding.code})")
            error = ET.SubElement(element, "error", type=finding.code, message=finding.message)
            error.text = str(finding)
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
    for key, value in totals.items():
        root.set(key, str(value))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")
