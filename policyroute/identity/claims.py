"""Reading scopes, roles and step-up facts out of verified claims; paths split once."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Reader = Callable[[Mapping[str, Any]], frozenset[str]]


def _walk(path: tuple[str, ...]) -> Callable[[Mapping[str, Any]], Any]:
    if len(path) == 1:
        name = path[0]
        return lambda claims: claims.get(name)

    def walk(claims: Mapping[str, Any]) -> Any:
        node: Any = claims
        for part in path:
            if not isinstance(node, Mapping):
                return None
            node = node.get(part)
        return node

    return walk


def _strings(value: Any, *, split: bool) -> frozenset[str]:
    if isinstance(value, str):
        if not split:
            return frozenset((value,))
        # RFC 6749 section 3.3: scopes are separated by one space (%x20) and nothing else;
        # "a\tb" is one scope, which no policy scope (a scope-token) ever matches.
        return frozenset(part for part in value.split(" ") if part)
    if isinstance(value, list | tuple):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


def claim_value(path: str) -> Callable[[Mapping[str, Any]], Any]:
    """A reader of a dotted claim path giving its value as the token holds it (None if absent)."""
    return _walk(tuple(path.split(".")))


def claim_reader(path: str, *, split: bool) -> Reader:
    """A reader of a dotted claim path (e.g. `realm_access.roles`) giving a set of strings."""
    # A string is split on %x20 spaces when `split` (OAuth `scope`), else it is one value
    # (Supabase `role`); a list gives its string members (Keycloak, Auth0 `permissions`).
    walk = _walk(tuple(path.split(".")))
    return lambda claims: _strings(walk(claims), split=split)


def number(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim, or None when absent or not a finite number."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None
