"""TOTP second factor (RFC 6238): pyotp codes, accepted once across workers, with lockout.

The secret comes from a `SecretSource`; the default is a Valkey hash per account, written
by `enrol` and removed by `revoke` (also `policyroute mfa enrol|revoke`). A different
source (a database, a vault) is plugged in as the `totp_secrets` service of `install`;
it is asked by subject. The replay and lockout records are always kept per account
(`Principal.account`: the subject with one issuer, else issuer, tenant and subject).
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyotp

from ..backends.valkey import Store, ValkeyStore
from ..language.policy import TotpSettings
from ..principal import Principal

STEP_SECONDS = 30
MAX_CODE_BYTES = 16


@runtime_checkable
class SecretSource(Protocol):
    """Where the base32 TOTP secret of a subject comes from."""

    async def totp_secret(self, subject: str) -> str | None:
        """The subject's base32 secret, or None when none is enrolled."""
        ...


def code_at(secret: str, for_time: float, digits: int = 6) -> str:
    """The code of a base32 secret at a Unix time (SHA-1, 30 s steps, T0 = 0)."""
    return pyotp.TOTP(secret, digits=digits, interval=STEP_SECONDS).at(for_time)


def matching_step(secret: str, code: str, for_time: float, *, digits: int,
                  drift: int) -> int | None:
    """The time step whose code equals `code`, looking `drift` steps either way; else None."""
    if len(code) != digits or not code.isascii() or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=digits, interval=STEP_SECONDS)
    now = totp.timecode(for_time)
    found: int | None = None
    for step in (now, now - drift, now + drift) if drift else (now,):
        # Compare every candidate: the time taken must not say which step matched.
        if hmac.compare_digest(totp.generate_otp(step), code) and found is None:
            found = step
    return found


class ValkeySecrets:
    """TOTP secrets in a Valkey hash per account (field `secret`)."""

    def __init__(self, store: ValkeyStore) -> None:
        self.store = store

    def hash_key(self, account: str) -> str:
        """The hash that holds the account's secret."""
        return self.store.key(account, "totp")

    async def totp_secret(self, account: str) -> str | None:
        """The base32 secret of an account (the subject itself in the short form), or None."""
        value = await self.store.command("HGET", self.hash_key(account), "secret",
                                         operation="totp secret")
        return _text(value)


@dataclass(frozen=True, slots=True)
class Enrolment:
    """A new TOTP secret: show the URI as a QR code, or the secret for manual entry."""

    account: str
    secret: str
    uri: str


@dataclass(frozen=True, slots=True)
class TotpResult:
    """The outcome of one code: accepted, or why not, or locked out for `retry_after` seconds."""

    accepted: bool
    reason: str = ""
    retry_after: int = 0

    @property
    def locked(self) -> bool:
        """True when the account is locked out."""
        return self.retry_after > 0


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return value if isinstance(value, str) else None


def _state_keys(store: Store, account: str) -> tuple[str, str, str]:
    return (store.key(account, "totp", "last"), store.key(account, "totp", "fail"),
            store.key(account, "totp", "lock"))


class TotpGuard:
    """Checks a caller's code: two Valkey round trips, each one atomic Lua script."""

    def __init__(self, store: ValkeyStore, settings: TotpSettings,
                 secrets: SecretSource | None = None) -> None:
        self.store = store
        self.settings = settings
        self.secrets: SecretSource = secrets or ValkeySecrets(store)
        # Decided once: the default source reads the secret inside the first script.
        self._hash = self.secrets.hash_key if isinstance(self.secrets, ValkeySecrets) else None
        self._record_args = (
            settings.max_failures,
            int(settings.window * 1000),
            int(settings.lockout * 1000),
            (settings.drift_steps + 2) * STEP_SECONDS * 1000,
        )

    async def _begin(self, who: Principal, *, fail_open: bool) -> tuple[int, str | None, float]:
        """(lockout ms left, the caller's secret, Valkey's time) in one round trip."""
        account, subject = who.account, who.subject
        assert account is not None and subject is not None
        _, _, lock = _state_keys(self.store, account)
        keys = [lock] if self._hash is None else [lock, self._hash(account)]
        lock_ms, raw_secret, seconds, micros = await self.store.run(
            "mfa_begin", keys, [], operation="totp check", fail_open=fail_open)
        if int(lock_ms) > 0:
            return int(lock_ms), None, 0.0
        secret = _text(raw_secret) if self._hash else await self.secrets.totp_secret(subject)
        return 0, secret, int(seconds) + int(micros) / 1_000_000

    def _step(self, secret: str | None, code: str, now: float) -> int | None:
        if not secret:
            return None
        return matching_step(secret, code, now, digits=self.settings.digits,
                             drift=self.settings.drift_steps)

    async def peek(self, who: Principal, code: str) -> TotpResult:
        """Whether the code is right now, recording nothing (no use, no failure): shadow mode."""
        lock_ms, secret, now = await self._begin(who, fail_open=True)
        if lock_ms:
            return TotpResult(False, "locked", math.ceil(lock_ms / 1000))
        if self._step(secret, code, now) is None:
            return TotpResult(False, "invalid")
        return TotpResult(True)

    async def check(self, who: Principal, code: str) -> TotpResult:
        """Accept the code once, or count a failure (and lock out after too many)."""
        assert who.account is not None
        last, fail, lock = _state_keys(self.store, who.account)
        lock_ms, secret, now = await self._begin(who, fail_open=False)
        if lock_ms:
            return TotpResult(False, "locked", math.ceil(lock_ms / 1000))
        step = self._step(secret, code, now)
        status, value = await self.store.run(
            "mfa_record", [last, fail, lock], [-1 if step is None else step, *self._record_args],
            operation="totp record", fail_open=False)
        status, value = int(status), int(value)
        if status == 1:
            return TotpResult(True)
        if status == -1:
            return TotpResult(False, "locked", math.ceil(value / 1000))
        if status == 2:
            return TotpResult(False, "replayed")
        return TotpResult(False, "wrong" if secret else "not enrolled")


async def enrol(store: ValkeyStore, account: str, *, issuer_name: str = "policyroute",
                digits: int = 6, replace: bool = False, label: str | None = None) -> Enrolment:
    """Give an account a new TOTP secret in Valkey; refuse to overwrite one unless `replace`.

    `account` is `Principal.account` (the subject itself with one issuer and no tenant
    claim); `label` names the user in the authenticator app (default: `account`).
    """
    secret = pyotp.random_base32()
    key = ValkeySecrets(store).hash_key(account)
    name = label if label is not None else account
    if replace:
        await store.command("HSET", key, "secret", secret, operation="totp enrol")
    else:
        created = await store.command("HSETNX", key, "secret", secret, operation="totp enrol")
        if not int(created):
            raise ValueError(f"{name!r} already has a TOTP secret; revoke it or replace it")
    uri = pyotp.TOTP(secret, digits=digits, interval=STEP_SECONDS).provisioning_uri(
        name=name, issuer_name=issuer_name)
    return Enrolment(account, secret, uri)


async def revoke(store: ValkeyStore, account: str) -> bool:
    """Remove an account's TOTP secret and its replay and lockout state; True if it had one."""
    secret_key = ValkeySecrets(store).hash_key(account)
    had = await store.command("DEL", secret_key, operation="totp revoke")
    await store.command("DEL", *_state_keys(store, account), operation="totp revoke")
    return int(had) > 0
