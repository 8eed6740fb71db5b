"""Data at rest: AES-256-GCM with key ids, so keys rotate without losing old records.

Keys come from the environment: `POLICYROUTE_DATA_KEYS="k2:<base64 32 bytes>,k1:<...>"`,
or else from the file `POLICYROUTE_DATA_KEYS_FILE` names (the same text).
The first key seals; every listed key opens. A sealed value is
`PRS1.<kid>.<base64url nonce+ciphertext>` as bytes; the associated data (the Valkey key
or the event's route) binds a ciphertext to where it was stored.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import PolicyrouteError

ENV = "POLICYROUTE_DATA_KEYS"
MAGIC = b"PRS1"
NONCE_BYTES = 12


class DataKeyError(PolicyrouteError):
    """A data key is missing, malformed, or does not open a sealed value."""


class Keyring:
    """Named AES-256-GCM keys; the first seals, all open."""

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if active not in keys:
            raise DataKeyError(f"active data key {active!r} is not among the keys")
        for kid, key in keys.items():
            if len(key) != 32:
                raise DataKeyError(f"data key {kid!r} must be 32 bytes (AES-256), got {len(key)}")
            if not kid or not kid.isascii() or "." in kid or "," in kid or ":" in kid:
                raise DataKeyError(f"data key id {kid!r} must be ASCII without '.', ',' or ':'")
        self._aead = {kid: AESGCM(key) for kid, key in keys.items()}
        self._raw = dict(keys)
        self._fp_keys: dict[str, bytes] = {}
        self.active = active

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """Keys from `kid:base64,kid:base64`; the first is the active one."""
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for item in (p.strip() for p in spec.split(",")):
            if not item:
                continue
            kid, sep, b64 = item.partition(":")
            if not sep:
                raise DataKeyError(f"{ENV}: expected kid:base64key, got an entry without ':'")
            try:
                keys[kid.strip()] = base64.b64decode(b64.strip(), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise DataKeyError(f"{ENV}: key {kid.strip()!r} is not valid base64") from exc
            order.append(kid.strip())
        if not order:
            raise DataKeyError(f"{ENV} is empty; set at least one kid:base64key")
        return cls(keys, order[0])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring | None:
        """The keyring of `POLICYROUTE_DATA_KEYS`, or None when it is not set."""
        spec = (environ if environ is not None else os.environ).get(ENV, "")
        return cls.parse(spec) if spec.strip() else None

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        """The keyring written in a file (`kid:base64,...`, surrounding whitespace ignored)."""
        try:
            spec = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DataKeyError(f"data keys file {str(path)!r}: {exc.strerror or exc}") from exc
        try:
            return cls.parse(spec.strip())
        except DataKeyError as exc:
            raise DataKeyError(f"data keys file {str(path)!r}: {exc}") from exc

    @staticmethod
    def generate(kid: str) -> str:
        """A new `kid:base64key` entry with 32 random bytes."""
        return f"{kid}:{base64.b64encode(secrets.token_bytes(32)).decode()}"

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Encrypt and authenticate `plaintext` with the active key."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead[self.active].encrypt(nonce, plaintext, aad)
        body = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=")
        return b".".join((MAGIC, self.active.encode(), body))

    def open(self, token: bytes, aad: bytes = b"") -> bytes:
        """Decrypt a value `seal` made; raise DataKeyError when it is not authentic."""
        magic, _, rest = token.partition(b".")
        kid_raw, _, body = rest.partition(b".")
        if magic != MAGIC or not body:
            raise DataKeyError("not a sealed value")
        kid = kid_raw.decode("ascii", "replace")
        aead = self._aead.get(kid)
        if aead is None:
            raise DataKeyError(f"sealed with unknown data key {kid!r}")
        try:
            raw = base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))
            return aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad)
        except (InvalidTag, binascii.Error, ValueError) as exc:
            raise DataKeyError(f"sealed value does not open with data key {kid!r}") from exc

    def fingerprint(self, data: bytes) -> str:
        """A keyed digest (HMAC-SHA256 under a key derived from the active key) of `data`.

        Stands in for a plain hash where the input may be guessable (a request body of a
        sensitive route): equal inputs give equal fingerprints, but only key holders can
        test a guess.
        """
        derived = self._fp_keys.get(self.active)
        if derived is None:
            raw = self._raw[self.active]
            derived = hmac.new(raw, b"policyroute fingerprint", "sha256").digest()
            self._fp_keys[self.active] = derived
        return self.active + ":" + hmac.new(derived, data, "sha256").hexdigest()

    @staticmethod
    def is_sealed(value: bytes) -> bool:
        """True when `value` looks like the output of `seal`."""
        return value.startswith(MAGIC + b".")
