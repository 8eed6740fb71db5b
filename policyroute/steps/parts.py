"""What the fused state step and its parts share: the narrow protocol of a part.

A part (`RateLimitStep`, `CreditsStep`, `IdempotencyStep`, `CacheStep`) is one stateful
policy key. Of the fused step it knows this module only: it reads the request it is
given (`Request`), queues its ops for the before-handler and after-handler scripts,
reads its share of the reply, and is told how the request ended (`Outcome`).
`steps/state.py` composes the parts of a route into one `StateStep`; no part imports it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from starlette.types import Message, Send

from ..asgi.body import DEFAULT_MAX_BODY, Header
from ..backends.keys import TagMemo
from ..backends.valkey import Arg
from ..compile.step import Context, Step
from ..crypto import Keyring
from ..principal import address_tag, subject_tag


def principal_tag(ctx: Context) -> str:
    """The hash tag of the caller's state: its account when authenticated, else its address.

    Every per-principal key (credits, `user` limits and concurrency slots, idempotency
    records, private cache entries) is made under this tag; the account names issuer and
    tenant when the settings need them (`identity.accounts.Accounts`).
    """
    account = ctx.principal.account
    if account is not None:
        return _SUBJECT_TAGS.get(account)
    return client_tag(ctx)


def client_tag(ctx: Context) -> str:
    """The hash tag of the caller's address (`address_tag`), one object for its requests."""
    return _ADDRESS_TAGS.get(ctx.client or "-")  # no address: "ip:-", as `address_tag(None)`


# The same tag object for a caller's every request: the keys made from it are then found
# by identity in the memos that follow (`TagMemo`), not hashed and compared again.
_SUBJECT_TAGS: Final[TagMemo[str]] = TagMemo(subject_tag)
_ADDRESS_TAGS: Final[TagMemo[str]] = TagMemo(address_tag)


@dataclass(slots=True, init=False)
class Stored:
    """A response as stored in Valkey: status, raw headers, body.

    `unkept` is the size of a body too large to keep: the record then holds the status
    alone (an idempotency record of a response past `idempotency.max_body`).
    """

    status: int
    headers: list[Header]
    body: bytes
    unkept: int

    # Made for every response kept: an `__init__` of its own, which the compiled build runs
    # natively (a dataclass's generated one would be interpreted).
    def __init__(self, status: int, headers: list[Header], body: bytes, unkept: int = 0) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.unkept = unkept

    def encode(self) -> tuple[int, bytes, bytes]:
        """(status, header block, body) for the Lua scripts, which keep them opaque.

        The header block is names and values joined by NUL, which no valid header holds;
        headers that do hold one (or an empty list) are written as a JSON list instead.
        A record without its body has a JSON object there, which neither form starts with.
        """
        if self.unkept:
            return self.status, json.dumps({"unkept": self.unkept}).encode(), b""
        flat = [item for pair in self.headers for item in pair]
        block = b"\0".join(flat)
        if block.count(b"\0") != len(flat) - 1 or block[:1] == b"[":
            pairs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers]
            block = json.dumps(pairs, separators=(",", ":")).encode()
        return self.status, block, self.body

    @classmethod
    def decode(cls, code: Any, headers: Any, body: Any) -> Stored:
        """The response from the script's reply fields (either header block form)."""
        raw = headers.encode() if isinstance(headers, str) else bytes(headers)
        if raw[:1] == b"{":
            return cls(int(code), [], b"", unkept=int(json.loads(raw)["unkept"]))
        if raw[:1] == b"[":
            pairs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(raw)]
        else:
            items = raw.split(b"\0")
            pairs = list(zip(items[::2], items[1::2], strict=True))
        return cls(int(code), pairs, bytes(body))

    async def send(self, send: Send, extra: Sequence[Header], head: bool) -> None:
        """Send the stored response byte for byte, plus `extra` headers."""
        start: Message = {
            "type": "http.response.start",
            "status": self.status,
            "headers": [*self.headers, *extra],
        }
        await send(start)
        await send({"type": "http.response.body", "body": b"" if head else self.body})


@dataclass(frozen=True, slots=True)
class Vault:
    """How a route's records reach Valkey: as they are, or sealed with the data keys.

    Routes marked `sensitive` (or naming encrypt/decrypt fields) keep cached responses
    and idempotency records as AES-GCM ciphertext bound to their Valkey key, and
    fingerprint request bodies with a keyed digest instead of a plain hash.
    """

    keyring: Keyring | None = None

    def pack(self, stored: Stored, key: str) -> tuple[int, bytes, bytes]:
        """The record fields the finish script writes."""
        code, headers, body = stored.encode()
        if self.keyring is None:
            return code, headers, body
        aad = key.encode()
        return code, self.keyring.seal(headers, aad), self.keyring.seal(body, aad)

    def unpack(self, key: str, code: Any, headers: Any, body: Any) -> Stored:
        """The response from stored record fields; raise DataKeyError when it does not open."""
        if self.keyring is not None:
            aad = key.encode()
            headers = self.keyring.open(bytes(headers), aad)
            body = self.keyring.open(bytes(body), aad)
        return Stored.decode(code, headers, body)

    def fingerprint(self, data: bytes) -> str:
        """A digest of a request for comparing repeats (keyed when sealed)."""
        if self.keyring is None:
            return hashlib.sha256(data).hexdigest()
        return self.keyring.fingerprint(data)


PLAIN = Vault()


class Request:
    """What the parts of one request compute and share.

    Ops are appended with `op` (before the handler) and `finish` (after it); each op is
    an opcode with its arguments and the keys it touches, kept flat for one script call
    and, when `marked` (a cluster's requests), marked so they can be split by hash tag
    (`steps/slots.py`).
    """

    __slots__ = (
        "args",
        "ctx",
        "data",
        "extra",
        "finish_args",
        "finish_keys",
        "finish_marks",
        "keys",
        "marked",
        "marks",
        "token",
    )

    def __init__(self, ctx: Context, token: str = "", marked: bool = True) -> None:
        # Plain slots, not a dataclass: one is made for every request of a stateful route.
        self.ctx = ctx
        self.token = token
        self.marked = marked
        self.keys: list[str] = []
        self.args: list[Arg] = []
        self.marks: list[tuple[int, int]] = []
        self.extra: list[Header] = []
        self.finish_keys: list[str] = []
        self.finish_args: list[Arg] = []
        self.finish_marks: list[tuple[int, int]] = []
        self.data: dict[str, Any] = {}

    def op(self, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Queue an op (opcode first in `args`) for the before-handler script."""
        if self.marked:
            self.marks.append((len(self.keys), len(self.args)))
        self.keys.extend(keys)
        self.args.extend(args)

    def finish(self, op: str, keys: Sequence[str], *args: Arg) -> None:
        """Queue an op for the after-handler script."""
        if self.marked:
            self.finish_marks.append((len(self.finish_keys), len(self.finish_args)))
        self.finish_keys.extend(keys)
        self.finish_args.append(op)
        self.finish_args.extend(args)

    def probe(self, call: Callable[[], Awaitable[None]]) -> None:
        """Run `call` alongside the before-handler script (shadow-mode evaluations).

        A probe never raises: it keeps its findings in `data` for its part's `settle`.
        """
        self.data.setdefault(PROBES, []).append(call)

    def absorb(self, other: Request) -> None:
        """Take over another request's after-handler ops (a probe's releases and undos)."""
        k0, a0 = len(self.finish_keys), len(self.finish_args)
        if self.marked:
            self.finish_marks.extend((k + k0, a + a0) for k, a in other.finish_marks)
        self.finish_keys.extend(other.finish_keys)
        self.finish_args.extend(other.finish_args)


PROBES: Final = "probes"
# req.data: what must be awaited after the parts settled and before the answer or the
# handler (a throttle's turn, a debounce waiting to join another request's response).
PAUSES: Final = "pauses"


class Outcome:
    """How the request ended, as the after-handler parts need it."""

    __slots__ = (
        "body",
        "done",
        "dropped",
        "error",
        "gone",
        "handler_ran",
        "headers",
        "size",
        "started",
        "status",
    )

    def __init__(
        self,
        *,
        handler_ran: bool = False,
        status: int = 0,
        started: bool = False,
        done: bool = False,
    ) -> None:
        self.handler_ran = handler_ran
        self.status = status
        self.headers: list[Header] = []
        self.body = bytearray()
        self.started = started
        self.done = done
        self.error: BaseException | None = None
        # Body bytes sent, counted while a part keeps the body; `dropped` once they passed
        # what any part keeps (`body` is then empty, and the response streamed through).
        self.size = 0
        self.dropped = False
        # The app was told the client disconnected (`http.disconnect`): a response it left
        # unfinished without raising was cut short by the client, not by the app.
        self.gone = False

    @property
    def complete(self) -> Stored | None:
        """The full response when one was sent completely and kept."""
        if not self.done or self.dropped:
            return None
        return Stored(self.status, list(self.headers), bytes(self.body))


class Part(Step):
    """One stateful policy key inside the fused `StateStep`."""

    guard = False
    fail_open: bool = False
    # Whether the handler must stop (and this part settle) when the client goes away.
    watch_disconnect: bool = False
    # Whether `after` needs to know that the app was told the client left (`Outcome.gone`).
    hears_disconnect: bool = False

    def peek(self, req: Request) -> None:
        """Answer from process memory before any part queues an op (the cache's first tier)."""

    # Whether `prepare` must await (read the request body): then `prepare_io` runs instead.
    needs_io: bool = False
    # The most a part that reads the whole request body reads (`make_state` sets it).
    body_limit: int = DEFAULT_MAX_BODY

    def prepare(self, req: Request) -> None:
        """Check what needs no backend (may raise Denial) and append this part's op."""

    async def prepare_io(self, req: Request) -> None:
        """`prepare` for a part that must await first (`needs_io`)."""
        self.prepare(req)

    def settle(self, req: Request, reply: list[Any]) -> None:
        """Read this part's share of the script's reply; may raise Denial."""

    # Whether `keeps` may ever say more than None for this part's policy.
    may_keep: bool = True

    def keeps(self, req: Request) -> int | None:
        """The most body bytes this part keeps of the request's response; None: none."""
        return None

    def after(self, req: Request, outcome: Outcome) -> None:
        """Queue after-handler ops for the finish script."""


class ClientGone(Exception):  # noqa: N818 - an outcome, recorded rather than raised
    """The client disconnected while the handler ran."""


async def sleep_ms(ms: float) -> None:
    """Sleep a number of milliseconds."""
    await asyncio.sleep(ms / 1000)
