"""Structured JSON logs with the request id, and a sanitizer no secret gets through.

`LogFilter` does two things to every record it sees: it adds `request_id` (the id of the
request being served, from a context variable the chain sets), and it redacts what must
never be logged (OWASP logging cheat sheet):

- bearer and basic credentials, and anything shaped like a JWT (JWS or JWE);
- the values of sensitive keys in `extra=` mappings and in `key=value` / `"key": value`
  text: Authorization, Cookie, API keys, passwords, the TOTP code header, idempotency-key
  headers, and the PII field names (email, phone, ... and `POLICYROUTE_LOG_REDACT_FIELDS`);
- e-mail addresses anywhere (while `email` is a PII field, as it is by default);
- the exact values the current request carried in its credential, TOTP code, API key,
  cookie and idempotency-key headers, wherever they appear (a message, an exception).

The filter sits on every `policyroute` logger and on uvicorn's (`uvicorn`, `uvicorn.error`,
`uvicorn.access`, `uvicorn.asgi`), so records are clean at the source whatever handlers
log them, and on the handler `configure_logging` installs (so the application's own records
are cleaned too). `sanitize_logger(logger)` protects any other. `policyroute run` hands
uvicorn `uvicorn_log_config()`, which also puts the filter on uvicorn's handlers and, with
`POLICYROUTE_LOG_JSON=1`, formats its lines as the same JSON lines.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import IO, Any

from .requests import CURRENT, Current

REDACTED = "[REDACTED]"


# Header names whose values are credentials or one-time secrets.
SECRET_HEADERS = {
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-totp-code",
    "idempotency-key",
}
# Key names (compared lower-case with `-` as `_`) whose values are never logged.
SECRET_KEYS = {
    "authorization",
    "proxy_authorization",
    "cookie",
    "set_cookie",
    "x_api_key",
    "api_key",
    "apikey",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "bearer",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "totp",
    "totp_code",
    "otp",
    "x_totp_code",
    "idempotency_key",
}
DEFAULT_PII_FIELDS = ("email", "phone", "ssn", "card_number", "iban", "date_of_birth")

_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{2,}(?:\.[A-Za-z0-9_-]*){2,4}")
# A credential after the scheme: long, or with a digit (so "a bearer token is" stays prose).
_CREDENTIAL = re.compile(
    r"(?i)\b(bearer|basic)(\s+)(?:[A-Za-z0-9\-._~+/]{12,}|[A-Za-z._~+/-]*[0-9][\w\-.~+/]*)=*"
)
# Values recognisable without a key: redacted wherever they appear while `email` is a
# sensitive field (it is by default).
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_MIN_SECRET = 4  # shorter request values are not searched for (they would match anything)

# LogRecord attributes that are not `extra=` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "_policyroute_clean",
}


def _norm(key: str) -> str:
    return key.strip().lower().replace("-", "_")


class Redaction:
    """Which keys and headers are sensitive; grows as apps install policies naming more."""

    def __init__(self) -> None:
        self.keys: set[str] = set(SECRET_KEYS) | {_norm(f) for f in DEFAULT_PII_FIELDS}
        self.headers: set[bytes] = {h.encode() for h in SECRET_HEADERS}
        self._pattern: re.Pattern[str] | None = None

    def add_keys(self, names: Iterable[str]) -> None:
        """Treat these field names (PII, secrets) as sensitive from now on."""
        new = {_norm(n) for n in names if n.strip()} - self.keys
        if new:
            self.keys |= new
            self._pattern = None

    def add_headers(self, names: Iterable[str]) -> None:
        """Treat these request headers (TOTP code, idempotency key) as secrets from now on."""
        names = [n.strip().lower() for n in names if n.strip()]
        self.headers |= {n.encode("latin-1") for n in names}
        self.add_keys(names)

    @property
    def pattern(self) -> re.Pattern[str]:
        """`key=value`, `key: value` and `"key": "value"` for every sensitive key."""
        if self._pattern is None:
            names = sorted(self.keys, key=len, reverse=True)
            alternatives = "|".join(re.escape(k).replace("_", "[-_]") for k in names)
            self._pattern = re.compile(
                rf"(?i)(?<![A-Za-z0-9])([\"']?(?:{alternatives})[\"']?\s*[:=]\s*)"
                # A value already redacted (a JWT, an e-mail) is taken whole, not re-wrapped.
                r"(\[REDACTED\](?![^\s,;&}\]\)])|\"[^\"]*\"|'[^']*'|[^\s,;&}\]\)]+)"
            )
        return self._pattern

    def sensitive(self, key: str) -> bool:
        """Whether a mapping key names a value that must not be logged."""
        return _norm(key) in self.keys


REDACTION = Redaction()


def request_secrets(current: Current) -> tuple[str, ...]:
    """The values of the request's secret headers (credentials, codes, keys), found once."""
    found = current.secrets
    if found is None:
        values: list[str] = []
        wanted = REDACTION.headers
        for name, raw in current.headers:
            if name.lower() not in wanted:
                continue
            value = raw.decode("latin-1").strip()
            values.append(value)
            rest = value.partition(" ")[2]
            if rest:
                values.append(rest.strip())  # the token without its scheme
            values.extend(v.strip().strip('"') for v in re.split(r"[;,]", value))
        found = tuple(sorted({v for v in values if len(v) >= _MIN_SECRET}, key=len, reverse=True))
        current.secrets = found
    return found


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with credentials, JWTs, sensitive `key=value` pairs and `secrets` redacted."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    text = _CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    if "@" in text and "email" in REDACTION.keys:
        text = _EMAIL.sub(REDACTED, text)
    return REDACTION.pattern.sub(lambda m: m.group(1) + REDACTED, text)


def clean(value: Any, secrets: tuple[str, ...] = (), depth: int = 0) -> Any:
    """A copy of a logged value with sensitive keys and strings redacted (bounded depth)."""
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, bytes | bytearray):
        return scrub(bytes(value).decode("utf-8", "replace"), secrets)
    if depth > 6:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            k: REDACTED
            if isinstance(k, str) and REDACTION.sensitive(k)
            else clean(v, secrets, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [clean(v, secrets, depth + 1) for v in value]
    if isinstance(value, bool | int | float) or value is None:
        return value
    return scrub(str(value), secrets)


class LogFilter(logging.Filter):
    """Adds `request_id` to every record and redacts secrets from it (in place, once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Clean the record; never drops one."""
        if getattr(record, "_policyroute_clean", False):
            return True
        current = CURRENT.get()
        if not getattr(record, "request_id", None):
            record.request_id = current.request_id if current is not None else None
        secrets = request_secrets(current) if current is not None else ()
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what was given, cleaned
            message = f"{record.msg!r} % {record.args!r}"
        clean_message = scrub(message, secrets)
        args = _clean_args(record, secrets, clean_message)
        if args is None:
            record.msg = clean_message
            # Uvicorn's colour variant of the message is a format string for the args.
            record.__dict__.pop("color_message", None)
        record.args = args
        for key, value in list(vars(record).items()):
            if key in _STANDARD:
                continue
            setattr(record, key, REDACTED if REDACTION.sensitive(key) else clean(value, secrets))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, secrets)
        record._policyroute_clean = True
        return True


def _clean_args(
    record: logging.LogRecord, secrets: tuple[str, ...], clean_message: str
) -> tuple[Any, ...] | None:
    """The record's args cleaned one by one, when they format to `clean_message`; else None.

    Keeping the format string and its args lets formatters that read the args (uvicorn's
    access formatter) work on a cleaned record. Where a secret would span the format and
    an argument, the pieces do not format to the cleaned message, and the record carries
    that message alone.
    """
    args = record.args
    if not isinstance(args, tuple) or not args:
        return None
    cleaned = tuple(
        a if isinstance(a, bool | int | float) or a is None else clean(a, secrets) for a in args
    )
    try:
        formatted = str(record.msg) % cleaned
    except Exception:  # a conversion the cleaned value no longer fits (%d of a string)
        return None
    return cleaned if formatted == clean_message else None


FILTER = LogFilter()


# Record attributes that only restate the message for a terminal (uvicorn's colours).
_PRESENTATION = {"color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as compact JSON."""
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _PRESENTATION and not key.startswith("_"):
                doc[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, ensure_ascii=False, default=str, separators=(",", ":"))


POLICYROUTE_LOGGERS = (
    "policyroute",
    "policyroute.access",
    "policyroute.auth",
    "policyroute.reload",
    "policyroute.shadow",
)


# Uvicorn's loggers: the access log names each request's path and query, the error log
# the exceptions of the application.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def sanitize_logger(logger: logging.Logger) -> None:
    """Add the sanitizing filter to a logger (records logged on it are cleaned at the source)."""
    if FILTER not in logger.filters:
        logger.addFilter(FILTER)


def protect() -> None:
    """Put the filter on every `policyroute` logger that exists, and on uvicorn's."""
    names = set(POLICYROUTE_LOGGERS) | set(UVICORN_LOGGERS)
    names.update(n for n in logging.root.manager.loggerDict if n.partition(".")[0] == "policyroute")
    for name in sorted(names):
        sanitize_logger(logging.getLogger(name))


def configure_logging(
    level: int | str = logging.INFO, *, stream: IO[str] | None = None, json_lines: bool = True
) -> logging.Handler:
    """Log to `stream` (stderr) as JSON lines, every record with its request id, sanitized.

    Installs one handler on the root logger (replacing one this function installed before)
    and returns it; the application's own loggers go through the same filter.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_policyroute", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._policyroute = True  # type: ignore[attr-defined]
    handler.addFilter(FILTER)
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level)
    protect()
    return handler


def uvicorn_log_config(*, json_lines: bool, level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn: its loggers and handlers sanitized.

    As uvicorn's own: the server's lines on stderr, the access log on stdout; as JSON lines
    (`JsonFormatter`) when `json_lines`, else uvicorn's text with the cleaned message.
    """
    text = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"}
    formatter: dict[str, Any] = {"()": JsonFormatter} if json_lines else text
    sanitized = {"filters": ["sanitize"], "formatter": "line", "class": "logging.StreamHandler"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"sanitize": {"()": lambda: FILTER}},
        "formatters": {"line": formatter},
        "handlers": {
            "default": {**sanitized, "stream": "ext://sys.stderr"},
            "access": {**sanitized, "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "uvicorn": {
                "handlers": ["default"],
                "level": level,
                "propagate": False,
                "filters": ["sanitize"],
            },
            "uvicorn.error": {"level": level, "filters": ["sanitize"]},
            "uvicorn.access": {
                "handlers": ["access"],
                "level": level,
                "propagate": False,
                "filters": ["sanitize"],
            },
            "uvicorn.asgi": {"filters": ["sanitize"]},
        },
    }


protect()
