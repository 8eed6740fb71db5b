"""The bound chain runs every guard, however it is written: async `check` or `check_now`."""

from __future__ import annotations

from collections.abc import Awaitable

import pytest
from starlette.types import Message, Receive, Scope, Send

from policyroute.asgi.chain import BoundChain
from policyroute.compile.chain import Chain
from policyroute.compile.step import Context, Step
from policyroute.errors import Denial, Problems


class AsyncOnly(Step):
    """A guard written the long way: it overrides `check` alone."""

    name = "async_only"

    async def check(self, ctx: Context) -> None:
        """Refuse everyone."""
        raise Denial(Problems.FORBIDDEN_ROLE, "refused by an async check")


class Later(Step):
    """A guard whose `check_now` hands back an awaitable that refuses."""

    name = "later"

    def check_now(self, ctx: Context) -> Awaitable[None] | None:
        """Decide after an await."""
        return self._refuse()

    async def _refuse(self) -> None:
        raise Denial(Problems.IP_NOT_ALLOWED, "refused after an await")


class Now(Step):
    """A guard that lets the request on at once."""

    name = "now"

    def check_now(self, ctx: Context) -> None:
        """Allow."""
        ctx.state["seen_by_now"] = True


async def _call(steps: tuple[Step, ...]) -> tuple[int, bool]:
    """(status, whether the app ran) for one GET through a chain of `steps`."""
    ran: list[bool] = []
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        ran.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "method": "GET", "path": "/x", "headers": [],
                    "query_string": b"", "client": ("127.0.0.1", 1)}  # fmt: skip
    await BoundChain(Chain("GET /x", steps))(scope, receive, send, app)
    return int(sent[0]["status"]), bool(ran)


@pytest.mark.parametrize(
    ("steps", "status"),
    [((Now(), AsyncOnly()), 403), ((Now(), Later()), 403), ((Now(),), 200)],
    ids=["async-check-only", "check-now-awaitable", "check-now-allows"],
)
async def test_every_guard_decides_whichever_way_it_is_written(
    steps: tuple[Step, ...], status: int
) -> None:
    assert await _call(steps) == (status, status == 200)
