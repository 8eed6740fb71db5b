"""The server's own receive, found behind policyroute's wrappers of it."""

from __future__ import annotations

from typing import Any

from starlette.types import Message

from policyroute.asgi.body import replay, upstream_of


class _Server:
    """A server whose `receive` is a bound method, as uvicorn's is."""

    def __init__(self) -> None:
        self.messages: list[Message] = [{"type": "http.disconnect"}]

    async def receive(self) -> Message:
        return self.messages.pop(0)


async def test_the_server_receive_is_found_behind_replays_of_it() -> None:
    server = _Server()
    once = replay(b"body", server.receive)
    twice = replay(b"", once, more=True)
    assert upstream_of(server.receive) == server.receive
    assert upstream_of(once) == server.receive
    assert upstream_of(twice) == server.receive
    assert await upstream_of(twice)() == {"type": "http.disconnect"}


async def test_a_bound_method_reads_upstream_from_its_function_as_getattr_does() -> None:
    async def inner() -> Message:
        return {"type": "http.disconnect"}

    class Wrapper:
        async def receive(self) -> Message:
            return await inner()

    Wrapper.receive.upstream = inner  # type: ignore[attr-defined]
    bound: Any = Wrapper().receive
    assert bound.upstream is inner  # what getattr on the method gives
    assert upstream_of(bound) is inner


async def test_a_plain_receive_is_its_own_upstream() -> None:
    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    assert upstream_of(receive) is receive
