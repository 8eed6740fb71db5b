"""Validated scalar types of the policy language: durations, sizes, CIDRs, topics, scopes."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOPIC = re.compile(
    r"^(persistent|non-persistent)://[A-Za-z0-9_.=-]+/[A-Za-z0-9_.=-]+/[A-Za-z0-9_.=:-]+$"
)
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_duration(value: Any) -> float:
    """Seconds from `250ms`, `30s`, `5m`, `1h`, `1d` or a non-negative number."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string like '30s' or a number of seconds, not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        raise ValueError(
            f"invalid duration {value!r}: use a number with a unit "
            "(250ms, 30s, 5m, 1h, 1d) or a number of seconds"
        )
    raise ValueError(f"a duration is a string like '30s' or a number of seconds, got {value!r}")


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration, for explain and schema output."""
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    millis = seconds * 1000
    return f"{int(millis)}ms" if millis.is_integer() else f"{seconds}s"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)\s*$")
_UNIT_BYTES = {
    "B": 1,
    "KB": 1000,
    "KiB": 1 << 10,
    "MB": 1000**2,
    "MiB": 1 << 20,
    "GB": 1000**3,
    "GiB": 1 << 30,
}


def parse_size(value: Any) -> int:
    """Bytes from `512B`, `64KiB`, `1MiB`, `10MB`, `1GiB` or a non-negative whole number."""
    if isinstance(value, bool):
        raise ValueError("a size is a string like '1MiB' or a number of bytes, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            size = float(match.group(1)) * _UNIT_BYTES[match.group(2)]
            if not size.is_integer():
                raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
            return int(size)
        raise ValueError(
            f"invalid size {value!r}: use a number with a unit "
            "(512B, 64KiB, 1MiB, 10MB, 1GiB) or a number of bytes"
        )
    raise ValueError(f"a size is a string like '1MiB' or a number of bytes, got {value!r}")


def format_size(size: int) -> str:
    """The shortest exact spelling of a size in binary units, for explain and schema output."""
    for unit in ("GiB", "MiB", "KiB"):
        if size >= _UNIT_BYTES[unit] and size % _UNIT_BYTES[unit] == 0:
            return f"{size // _UNIT_BYTES[unit]}{unit}"
    return f"{size}B"


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4 or IPv6 network from CIDR notation; a bare address is a /32 or /128."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a network is a CIDR string like '10.0.0.0/8', got {value!r}")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"invalid CIDR {value!r}: {exc}") from None
        raise ValueError(
            f"invalid CIDR {value!r}: host bits are set; did you mean '{loose}'?"
        ) from None


def parse_topic(value: Any) -> str:
    """A fully qualified Pulsar topic name."""
    if not isinstance(value, str) or not _TOPIC.match(value):
        raise ValueError(
            f"invalid Pulsar topic {value!r}: use persistent://tenant/namespace/topic "
            "or non-persistent://tenant/namespace/topic"
        )
    return value


def parse_scope(value: Any) -> str:
    """An OAuth scope token (RFC 6749 section 3.3)."""
    if not isinstance(value, str) or not _SCOPE.match(value):
        raise ValueError(
            f"invalid scope {value!r}: a scope is one token of printable ASCII "
            "without spaces, quotes or backslashes"
        )
    return value


def parse_header_name(value: Any) -> str:
    """An HTTP header field name (RFC 9110 token), lower-cased."""
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ValueError(f"invalid header name {value!r}")
    return value.lower()


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "A duration: 250ms, 30s, 5m, 1h, 1d, or seconds as a number.",
        }
    ),
]
ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": _SIZE.pattern},
                {"type": "integer", "minimum": 0},
            ],
            "description": "A size: 512B, 64KiB, 1MiB, 10MB, 1GiB, or bytes as a number.",
        }
    ),
]
Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(parse_network),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "An IPv4 or IPv6 CIDR, e.g. 10.0.0.0/8."}),
]
Topic = Annotated[
    str,
    BeforeValidator(parse_topic),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": _TOPIC.pattern,
            "description": "A Pulsar topic: persistent://tenant/namespace/topic.",
        }
    ),
]
Scope = Annotated[
    str,
    BeforeValidator(parse_scope),
    WithJsonSchema({"type": "string", "pattern": _SCOPE.pattern}),
]
HeaderName = Annotated[
    str,
    BeforeValidator(parse_header_name),
    WithJsonSchema({"type": "string", "pattern": _HEADER_NAME.pattern}),
]
