"""`encrypt_fields` / `decrypt_fields`: JSON fields sealed for the handler, opened for the client.

A request field named in `encrypt_fields` reaches the handler (and anything it stores)
as an AES-GCM token string; a response field named in `decrypt_fields` that holds such a
token leaves decrypted. The field's path is the associated data, so a token only opens
as the field it was made for. `sensitive: true` itself is enforced where data is stored:
the state step seals cached responses and idempotency records, the events step seals its
outbox.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from starlette.types import Message

from .._types import format_size
from ..asgi.body import DEFAULT_MAX_BODY, is_json, read_body, replay
from ..compile.compiler import Env, register
from ..compile.step import Context, Handler, Step
from ..crypto import DataKeyError, Keyring
from ..errors import Denial, Problems
from ..language.policy import RoutePolicy
from .request import body_limit

Path = tuple[str, ...]


def _paths(names: Sequence[str]) -> tuple[Path, ...]:
    return tuple(tuple(n.split(".")) for n in names)


def _parent(doc: Any, path: Path) -> dict[str, Any] | None:
    """The object holding the last part of `path`, or None when the path is absent."""
    node = doc
    for part in path[:-1]:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node if isinstance(node, dict) and path[-1] in node else None


def seal_fields(keyring: Keyring, doc: Any, paths: Sequence[Path]) -> int:
    """Replace each present field by a token of its JSON value; return how many."""
    done = 0
    for path in paths:
        parent = _parent(doc, path)
        if parent is None:
            continue
        plain = json.dumps(parent[path[-1]], separators=(",", ":")).encode()
        parent[path[-1]] = keyring.seal(plain, ".".join(path).encode()).decode("ascii")
        done += 1
    return done


def open_fields(keyring: Keyring, doc: Any, paths: Sequence[Path]) -> int:
    """Replace each present token by its value; raise DataKeyError when one does not open."""
    done = 0
    for path in paths:
        parent = _parent(doc, path)
        if parent is None:
            continue
        value = parent[path[-1]]
        if not isinstance(value, str) or not Keyring.is_sealed(value.encode()):
            continue  # not sealed (data written before the field was): leave it
        plain = keyring.open(value.encode("ascii"), ".".join(path).encode())
        parent[path[-1]] = json.loads(plain)
        done += 1
    return done


def _too_deep() -> Denial:
    return Denial(
        Problems.INVALID_BODY,
        "the request body's JSON is nested too deeply to read; this route seals request "
        "fields, so it reads the body",
    )


def _with_length(headers: Sequence[tuple[bytes, bytes]], size: int) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    out.append((b"content-length", str(size).encode()))
    return out


class FieldsStep(Step):
    """Seal named request fields before the handler; open named response fields after it."""

    name = "fields"
    guard = False

    def __init__(
        self,
        keyring: Keyring,
        encrypt: Sequence[str],
        decrypt: Sequence[str],
        body_limit: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.keyring = keyring
        self.body_limit = body_limit
        self.encrypt_names = tuple(encrypt)
        self.decrypt_names = tuple(decrypt)
        self.encrypt = _paths(encrypt)
        self.decrypt = _paths(decrypt)

    def describe(self) -> str:
        """Which fields are sealed and opened."""
        out = []
        if self.encrypt:
            out.append(
                "seal request fields " + ", ".join(self.encrypt_names) + " (bodies over "
                f"{format_size(self.body_limit)} refused, 413)"
            )
        if self.decrypt:
            out.append("open response fields " + ", ".join(self.decrypt_names))
        return "; ".join(out) + f" (AES-256-GCM, active key id {self.keyring.active!r})"

    async def around(self, ctx: Context, call_next: Handler) -> None:
        """Rewrite the request body, run the handler, rewrite the response body."""
        if self.encrypt:
            await self._seal_request(ctx)
        if not self.decrypt:
            await call_next(ctx)
            return
        messages: list[Message] = []
        original = ctx.send

        async def keep(message: Message) -> None:
            messages.append(message)

        ctx.send = keep
        try:
            await call_next(ctx)
        finally:
            ctx.send = original
        for message in self._open_response(messages):
            await original(message)

    async def _seal_request(self, ctx: Context) -> None:
        body = await read_body(ctx, self.body_limit)
        if not body:
            return
        try:
            doc = json.loads(body)
        except ValueError:
            raise Denial(
                Problems.INVALID_BODY,
                "this route seals request fields, so its body must be a JSON object",
            ) from None
        except RecursionError:
            raise _too_deep() from None
        try:
            if not isinstance(doc, dict) or not seal_fields(self.keyring, doc, self.encrypt):
                return
            sealed = json.dumps(doc, separators=(",", ":")).encode()
        except RecursionError:
            # Parsed, but one level too many to encode again (a deeper stack than the parse).
            raise _too_deep() from None
        ctx.scope["headers"] = _with_length(ctx.scope["headers"], len(sealed))
        ctx.receive = replay(sealed, ctx.receive)

    def _open_response(self, messages: list[Message]) -> list[Message]:
        start = next((m for m in messages if m["type"] == "http.response.start"), None)
        if start is None or not is_json(start.get("headers", [])):
            return messages
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            return messages  # not JSON this step can read: it leaves as the handler sent it
        try:
            if not open_fields(self.keyring, doc, self.decrypt):
                return messages
            opened = json.dumps(doc, separators=(",", ":")).encode()
        except DataKeyError as exc:
            raise Denial(
                Problems.SEALED_FIELD,
                "a response field is sealed with a data key this process does not hold",
            ) from exc
        except RecursionError:
            return messages
        head: Message = {
            **start,
            "headers": _with_length(start.get("headers", []), len(opened)),
        }
        return [head, {"type": "http.response.body", "body": opened, "more_body": False}]


def make_fields(policy: RoutePolicy, env: Env) -> Step | None:
    """The fields step when a route names fields to seal or open."""
    if not (policy.encrypt_fields or policy.decrypt_fields):
        return None  # `sensitive` alone is enforced by the state and events steps
    keyring: Keyring = env.service("keyring", "encrypt_fields/decrypt_fields")
    return FieldsStep(
        keyring, policy.encrypt_fields, policy.decrypt_fields, body_limit(policy, env)
    )


register(("encrypt_fields", "decrypt_fields", "sensitive"), make_fields)
