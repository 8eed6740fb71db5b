"""The per-request context and the step protocol every policy key compiles to."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from starlette.types import ASGIApp, Receive, Scope, Send

from ..principal import ANONYMOUS, SCOPE_KEY, Principal


class Context:
    """What the steps of one request share; built once per request."""

    __slots__ = (
        "_headers",
        "app",
        "client",
        "method",
        "principal",
        "receive",
        "route",
        "scope",
        "send",
        "state",
        "status",
    )

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, route: str, app: ASGIApp
    ) -> None:
        self.scope = scope
        self.app = app
        self.receive = receive
        self.send = send
        self.route = route
        self.method: str = scope.get("method", "GET")
        self._headers: dict[str, str] | None = None
        client = scope.get("client")
        self.client: str | None = client[0] if client else None
        self.principal: Principal = ANONYMOUS
        self.state: dict[str, Any] = {}
        self.status: int = 0
        scope[SCOPE_KEY] = ANONYMOUS

    @property
    def headers(self) -> dict[str, str]:
        """Request headers, lower-cased names; repeated fields joined with ', ' (RFC 9110)."""
        if self._headers is None:
            out: dict[str, str] = {}
            for raw_name, raw_value in self.scope["headers"]:
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                out[name] = f"{out[name]}, {value}" if name in out else value
            self._headers = out
        return self._headers

    def header_values(self, name: bytes) -> list[bytes]:
        """Every raw value of one header (name lower-case bytes), in order."""
        return [v for k, v in self.scope["headers"] if k.lower() == name]

    def set_principal(self, principal: Principal) -> None:
        """Record the caller for later steps and for the `principal` dependency."""
        self.principal = principal
        self.scope[SCOPE_KEY] = principal


Handler = Callable[[Context], Awaitable[None]]


class Step:
    """One compiled policy key.

    A guard step overrides `check` (raise `Denial` to refuse). A step that needs to act
    around the handler overrides `around` and calls `call_next(ctx)` zero or more times.
    """

    name: ClassVar[str] = "step"
    guard: ClassVar[bool] = True

    async def check(self, ctx: Context) -> None:
        """Refuse the request by raising `Denial`; return to let it on."""

    async def around(self, ctx: Context, call_next: Handler) -> None:
        """Run code around the rest of the chain."""
        await call_next(ctx)

    def describe(self) -> str:
        """The step's settings in one line, for `policyroute explain`."""
        return ""

    def __repr__(self) -> str:
        detail = self.describe()
        return f"{type(self).__name__}({detail})"
