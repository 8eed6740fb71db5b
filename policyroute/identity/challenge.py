"""RFC 6750 / RFC 9470 `WWW-Authenticate: Bearer` challenges."""

from __future__ import annotations


def _quote(value: str) -> str:
    # RFC 6750 section 3 allows %x20-21 / %x23-5B / %x5D-7E inside its quoted values.
    return '"' + "".join(c for c in value if " " <= c <= "~" and c not in '"\\') + '"'


def bearer_challenge(realm: str, error: str | None = None, description: str | None = None,
                     **params: str) -> dict[str, str]:
    """The `WWW-Authenticate` header of a bearer denial, as a headers mapping."""
    parts = [f"realm={_quote(realm)}"]
    if error is not None:
        parts.append(f"error={_quote(error)}")
    if description is not None:
        parts.append(f"error_description={_quote(description)}")
    parts.extend(f"{name}={_quote(value)}" for name, value in params.items())
    return {"WWW-Authenticate": "Bearer " + ", ".join(parts)}
