"""`request`: the body a route takes, refused (413, 415) before any step or handler reads it.

`max_body` is checked against the Content-Length before anything is read; a body sent
without one is counted as it streams and refused as soon as it passes the limit, so no
more than the limit is ever read. A handler that reads a body past the limit sees the
read fail (FastAPI then answers 400); that answer is dropped and the client gets the 413.
`content_types` is checked on requests that carry a body.
"""

from __future__ import annotations

from starlette.types import Message, Receive, Send

from .._types import format_size
from ..asgi.body import BODY_REFUSED, body_too_large, declared_length, upstream_of
from ..compile.compiler import Env, register
from ..compile.step import Context, Handler, Step
from ..errors import Denial, Problems
from ..language.policy import RequestLimits, RoutePolicy


class _Overrun:
    """One chunked request's count of body bytes, and whether it went past the limit."""

    __slots__ = ("denial", "seen", "started")

    def __init__(self) -> None:
        self.seen = 0
        self.denial: Denial | None = None
        self.started = False  # a response reached the client


class RequestStep(Step):
    """Refuse a body larger than `max_body` (413) or of a media type not listed (415)."""

    name = "request"
    guard = False
    traced = False  # compares sizes and names: named on the request span, no span of its own

    def __init__(self, limits: RequestLimits) -> None:
        self.max_body = limits.max_body
        self.types = frozenset(t for t in limits.content_types if not t.endswith("/*"))
        self.families = tuple(t[:-1] for t in limits.content_types if t.endswith("/*"))
        self.listed = tuple(limits.content_types)

    def describe(self) -> str:
        """The limit and the media types, in one line."""
        out = []
        if self.max_body is not None:
            out.append(f"bodies up to {format_size(self.max_body)} (413, checked as they stream)")
        if self.listed:
            out.append(f"content types {', '.join(self.listed)} (415)")
        return "; ".join(out) or "any body"

    def _media_allowed(self, ctx: Context) -> None:
        headers = ctx.headers
        length = headers.get("content-length")
        if (length is None or length == "0") and "transfer-encoding" not in headers:
            return  # no body, nothing to type
        raw = headers.get("content-type")
        media = raw.split(";", 1)[0].strip().lower() if raw is not None else ""
        if media in self.types or (media and media.startswith(self.families)):
            return
        named = f"{media!r} is not" if media else "a body without a Content-Type is not"
        raise Denial(
            Problems.UNSUPPORTED_MEDIA_TYPE,
            f"{named} accepted here; send one of {', '.join(self.listed)}",
            extra={"accepted": list(self.listed)},
        )

    async def around(self, ctx: Context, call_next: Handler) -> None:
        """Refuse what the headers already show; count a body sent without a length."""
        scope = ctx.scope
        if scope["type"] != "http":
            await call_next(ctx)
            return
        if self.listed:
            self._media_allowed(ctx)
        limit = self.max_body
        if limit is None:
            await call_next(ctx)
            return
        declared = declared_length(ctx)
        if declared is not None:
            if declared > limit:
                raise body_too_large(limit, declared)
            await call_next(ctx)  # the server never hands over more than it declared
            return
        if "transfer-encoding" not in ctx.headers and scope.get("http_version", "1.1") < "2":
            await call_next(ctx)  # HTTP/1 without either header: no body
            return
        await self._counted(ctx, call_next, limit)

    async def _counted(self, ctx: Context, call_next: Handler, limit: int) -> None:
        """Run the rest with the body counted as it is received (chunked transfer)."""
        run = _Overrun()
        receive, send = ctx.receive, ctx.send
        ctx.receive = _counting(ctx, receive, run, limit)
        ctx.send = _held_back(send, run)
        try:
            await call_next(ctx)
        except Exception:
            if run.denial is not None and not run.started:
                raise run.denial from None
            raise
        finally:
            ctx.receive, ctx.send = receive, send
        if run.denial is not None and not run.started:
            raise run.denial  # whatever the app answered to a read that failed is dropped


def _counting(ctx: Context, receive: Receive, run: _Overrun, limit: int) -> Receive:
    """A receive that refuses (413) the message that takes the body past `limit`."""

    async def counted() -> Message:
        if run.denial is not None:
            raise run.denial
        message = await receive()
        if message["type"] == "http.request":
            run.seen += len(message.get("body", b""))
            if run.seen > limit:
                run.denial = body_too_large(limit)
                ctx.state[BODY_REFUSED] = True
                raise run.denial
        return message

    counted.upstream = upstream_of(receive)  # type: ignore[attr-defined]
    return counted


def _held_back(send: Send, run: _Overrun) -> Send:
    """A send that drops the app's answer once its body read was refused."""

    async def guarded(message: Message) -> None:
        if run.denial is not None and not run.started:
            return
        run.started = True
        await send(message)

    return guarded


def make_request(policy: RoutePolicy, env: Env) -> Step | None:
    """The request step when the route sets `request` with something to check."""
    limits = policy.request
    if limits is None or (limits.max_body is None and not limits.content_types):
        return None
    return RequestStep(limits)


def body_limit(policy: RoutePolicy, env: Env) -> int:
    """The most a step of the route reads of a request body: `request.max_body`, else
    the process's `max_body` setting."""
    limits = policy.request
    if limits is not None and limits.max_body is not None:
        return limits.max_body
    return env.config.max_body


register(("request",), make_request)
