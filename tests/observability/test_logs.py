"""JSON logs carry the request id; the sanitizer lets no credential, code, key or PII through."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from policyroute.observability.logs import (
    REDACTED,
    REDACTION,
    JsonFormatter,
    LogFilter,
    clean,
    configure_logging,
    scrub,
)
from policyroute.observability.requests import CURRENT, sane

from .kit import bearer, install, running, token

JWT = token("log-user")


@contextlib.contextmanager
def json_logs() -> Iterator[io.StringIO]:
    """The root logger writing JSON lines to a buffer (as `configure_logging` sets it up)."""
    root = logging.getLogger()
    level = root.level
    buffer = io.StringIO()
    handler = configure_logging(logging.DEBUG, stream=buffer)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    """The JSON documents written so far."""
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def test_scrub_redacts_credentials_jwts_and_sensitive_pairs() -> None:
    text = (
        f"Authorization: Bearer {JWT} token={JWT[:20]} basic=no "
        'password=hunter2 {"email": "a@b.test", "x-totp-code": "123456"} ok=1'
    )
    out = scrub(text)
    assert JWT not in out and JWT[:20] not in out
    assert "hunter2" not in out and "a@b.test" not in out and "123456" not in out
    assert "ok=1" in out and "basic=no" in out
    assert scrub("Basic dXNlcjpwYXNz") == f"Basic {REDACTED}"
    assert scrub("a bearer token is required") == "a bearer token is required"


def test_clean_redacts_sensitive_keys_at_any_depth() -> None:
    value = {
        "headers": {"authorization": f"Bearer {JWT}", "Idempotency-Key": "k-1", "accept": "*/*"},
        "users": [{"email": "a@b.test", "name": "Ann"}],
        "note": f"sent {JWT}",
        "count": 3,
    }
    out = clean(value)
    assert out["headers"] == {
        "authorization": REDACTED,
        "Idempotency-Key": REDACTED,
        "accept": "*/*",
    }
    assert out["users"] == [{"email": REDACTED, "name": "Ann"}]
    assert JWT not in out["note"] and out["count"] == 3


def test_the_filter_cleans_message_arguments_extras_and_tracebacks() -> None:
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        record = logging.LogRecord(
            "app", logging.ERROR, __file__, 1, "login %s failed for %s", ("x", JWT), None
        )
        import sys

        record.exc_info = sys.exc_info()
    record.__dict__["session"] = {"cookie": "sid=abcdef", "path": "/x"}
    assert LogFilter().filter(record)
    assert JWT not in record.getMessage()
    assert record.__dict__["session"] == {"cookie": REDACTED, "path": "/x"}
    assert record.exc_text and JWT not in record.exc_text and "ValueError" in record.exc_text


def test_uvicorns_access_log_is_sanitized_at_its_logger_and_still_formats() -> None:
    """Under uvicorn's own logging config (an app served by `uvicorn app:app`), the access
    logger carries the filter, and uvicorn's access formatter, which reads the record's
    arguments, prints the cleaned request line."""
    from uvicorn.logging import AccessFormatter

    path = f"/items?access_token={JWT}&api_key=k-123456&page=2"
    args = ("127.0.0.1:50000", "GET", path, "1.1", 200)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None
    )
    assert logging.getLogger("uvicorn.access").filter(record)
    formatter = AccessFormatter(
        '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False
    )
    assert formatter.format(record) == (
        'INFO:     127.0.0.1:50000 - "GET /items?access_token=[REDACTED]&api_key=[REDACTED]'
        '&page=2 HTTP/1.1" 200 OK'
    )


@pytest.mark.parametrize("name", ["uvicorn", "uvicorn.error", "uvicorn.asgi"])
def test_uvicorns_other_loggers_are_sanitized_at_the_source(name: str) -> None:
    record = logging.LogRecord(name, logging.ERROR, __file__, 1, "failed: %s", (JWT,), None)
    record.__dict__["color_message"] = "failed: %s"
    assert logging.getLogger(name).filter(record)
    assert record.getMessage() == f"failed: {REDACTED}"
    # A secret that spans the format and an argument: the message is cleaned whole.
    record = logging.LogRecord(name, logging.ERROR, __file__, 1, "password=%s", ("pw-1",), None)
    record.__dict__["color_message"] = "password=%s"
    assert logging.getLogger(name).filter(record)
    assert (record.getMessage(), record.args) == (f"password={REDACTED}", None)
    assert "color_message" not in record.__dict__


def test_request_ids_are_the_callers_only_when_sane() -> None:
    assert sane("req-42") and sane("0af7651916cd43dd8448eb211c80319c")
    assert not sane("two words") and not sane("x" * 200) and not sane("")
    assert not sane(JWT)  # a token sent as a request id is never echoed or logged
    assert not sane("line\nbreak")


async def test_every_line_of_a_request_has_its_id_and_no_secret(policy_dir: Path) -> None:
    routes = "  POST /profile:\n    scopes: [write]\n"
    app, _ = install(policy_dir, routes)
    auth = {**bearer(token("ann", scopes=["write"])), "Idempotency-Key": "idem-secret-1"}
    with json_logs() as buffer:
        async with running(app) as c:
            r = await c.post(
                "/profile", json={"email": "ann@example.test", "name": "Ann"}, headers=auth
            )
            refused = await c.post("/profile", json={}, headers={"x-request-id": "caller-7"})
    assert r.status_code == 200 and refused.status_code == 401
    request_id = r.headers["x-request-id"]
    assert len(request_id) == 32 and refused.headers["x-request-id"] == "caller-7"
    docs = lines(buffer)
    mine = [d for d in docs if d["request_id"] == request_id]
    assert {d["logger"] for d in mine} >= {"tests.observability.app", "policyroute.access"}
    assert len([d for d in mine if d["logger"] == "tests.observability.app"]) == 4
    text = buffer.getvalue()
    for secret in ("ann@example.test", "idem-secret-1", auth["Authorization"][7:]):
        assert secret not in text
    [access] = [d for d in mine if d["logger"] == "policyroute.access"]
    assert access["route"] == "POST /profile" and access["status"] == 200
    assert access["outcome"] == "allowed" and access["duration_ms"] > 0
    [denied] = [d for d in docs if d["request_id"] == "caller-7"]
    assert (denied["outcome"], denied["reason"], denied["step"]) == (
        "denied",
        "unauthenticated",
        "auth",
    )
    assert CURRENT.get() is None  # the request's id does not leak into the next one


async def test_configured_pii_fields_are_redacted(policy_dir: Path) -> None:
    install(policy_dir, "  POST /profile: {public: true}\n", log_redact_fields="nickname")
    assert REDACTION.sensitive("nickname")
    with json_logs() as buffer:
        logging.getLogger("policyroute").warning(
            "renamed nickname=Zed", extra={"who": {"nickname": "Zed", "id": 7}}
        )
    [doc] = lines(buffer)
    assert "Zed" not in json.dumps(doc)
    assert doc["who"] == {"nickname": REDACTED, "id": 7}


@pytest.mark.parametrize("value", [b"a b", "\u00e9t\u00e9".encode(), b"x" * 129, b'a"b'])
async def test_an_insane_request_id_is_replaced(policy_dir: Path, value: bytes) -> None:
    app, _ = install(policy_dir, "  GET /ping: {public: true}\n")
    async with running(app) as c:
        r = await c.get("/ping", headers={b"x-request-id": value})
    assert r.status_code == 200
    echoed = r.headers["x-request-id"]
    assert echoed.encode() != value and len(echoed) == 32


async def test_the_configured_request_id_header_is_read_and_echoed(policy_dir: Path) -> None:
    app, _ = install(
        policy_dir, "  GET /ping: {public: true}\n", request_id_header="X-Correlation-Id"
    )
    async with running(app) as c:
        kept = await c.get("/ping", headers={"x-correlation-id": "corr-1"})
        denied = await c.get("/me", headers={"x-correlation-id": "corr-2"})  # no policy
    assert kept.headers["x-correlation-id"] == "corr-1"
    assert denied.status_code == 403 and denied.headers["x-correlation-id"] == "corr-2"
    assert "x-request-id" not in kept.headers


async def test_log_json_setting_installs_the_sanitizing_json_handler(policy_dir: Path) -> None:
    root = logging.getLogger()
    level = root.level
    install(policy_dir, "  GET /ping: {public: true}\n", log_json=True)
    try:
        [handler] = [h for h in root.handlers if getattr(h, "_policyroute", False)]
        assert isinstance(handler.formatter, JsonFormatter)
        assert any(isinstance(f, LogFilter) for f in handler.filters)
    finally:
        for h in [h for h in root.handlers if getattr(h, "_policyroute", False)]:
            root.removeHandler(h)
        root.setLevel(level)
