"""The request body in ASGI terms: read it once (within a limit), let the handler read it
again, refuse one that is too large.

Steps that must see the body before the handler (idempotency, encrypt_fields, retry, a
debounce, events) read it here: at most their limit is held, and `replay` hands the
handler what was read followed by the rest as it streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MethodType
from typing import Final

from starlette.types import Message, Receive

from ..compile.step import Context
from ..errors import Denial, Problems

# The most a step reads of a request body when neither the route nor the settings say.
DEFAULT_MAX_BODY = 1 << 20

# A raw header as ASGI carries it: (name, value).
Header = tuple[bytes, bytes]

# ctx.state: the request's body was refused (413) as it was read, by a step or the handler;
# the request then counts as refused before its endpoint ran (never charged).
BODY_REFUSED: Final = "body_refused"


def body_too_large(limit: int, size: int | None = None) -> Denial:
    """413 body-too-large: of `size` bytes as declared, or (None) grown past `limit`."""
    if size is None:
        detail = f"the request body is larger than this route takes ({limit} bytes)"
    else:
        detail = f"the request body is {size} bytes; this route takes at most {limit}"
    return Denial(Problems.BODY_TOO_LARGE, detail, extra={"limit": limit})


def declared_length(ctx: Context) -> int | None:
    """The request's Content-Length, when it sends a valid one."""
    length = ctx.headers.get("content-length")
    return int(length) if length is not None and length.isdigit() else None


async def read_body(ctx: Context, limit: int | None = None) -> bytes:
    """Read the whole request body once and let the handler read it again.

    With a `limit`, a larger body is refused (413): before anything is read when its
    Content-Length says so, else as soon as it grows past it, so at most `limit` bytes
    are ever held.
    """
    if limit is not None:
        declared = declared_length(ctx)
        if declared is not None and declared > limit:
            ctx.state[BODY_REFUSED] = True
            raise body_too_large(limit, declared)
    body, whole = await _read(ctx, limit)
    if not whole:
        assert limit is not None
        ctx.state[BODY_REFUSED] = True
        raise body_too_large(limit)
    return body


async def read_body_upto(ctx: Context, limit: int) -> bytes | None:
    """The whole request body when it is at most `limit` bytes, else None.

    Refuses nothing: past `limit` it stops reading, and the handler reads what was read
    followed by the rest as it streams, so at most `limit` bytes are held.
    """
    declared = declared_length(ctx)
    if declared is not None and declared > limit:
        return None
    body, whole = await _read(ctx, limit)
    return body if whole else None


async def _read(ctx: Context, limit: int | None) -> tuple[bytes, bool]:
    """Read the body, at most `limit` bytes of it; (what was read, whether it is whole).

    The handler then reads it again: the whole body, or what was read followed by the
    rest as it streams.
    """
    chunks: list[bytes] = []
    size = 0
    receive = ctx.receive
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        more = bool(message.get("more_body", False))
        if limit is not None and size > limit:
            ctx.receive = replay(b"".join(chunks), receive, more=more)
            return b"", False
        if not more:
            break
    body = b"".join(chunks)
    ctx.receive = replay(body, receive)
    return body, True


def is_json(headers: Sequence[Header]) -> bool:
    """Whether response headers declare a JSON body (application/json or any +json type)."""
    for name, value in headers:
        if name.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


def upstream_of(receive: Receive) -> Receive:
    """The server's own receive behind policyroute's wrappers (their `upstream`), else
    `receive` itself."""
    if type(receive) is MethodType:
        # The server's own, most often. A bound method's attributes are its function's,
        # read there: asking the method raises and catches an AttributeError each time.
        owner: object = receive.__func__
    else:
        owner = receive
    found: Receive = getattr(owner, "upstream", receive)
    return found


def replay(body: bytes, then: Receive, *, more: bool = False) -> Receive:
    """A receive that yields `body` once, then whatever `then` yields.

    `body` is the whole request, or with `more` the start of it (the rest comes from
    `then`). The server's own receive stays reachable as its `upstream` attribute.
    """
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await then()

    receive.upstream = upstream_of(then)  # type: ignore[attr-defined]
    return receive
