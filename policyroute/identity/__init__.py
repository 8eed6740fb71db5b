"""Who is calling: bearer JWT verification, client addresses and the TOTP second factor."""

from .challenge import bearer_challenge
from .client import ClientResolver
from .jwks import KeySource, fetch_jwks
from .tokens import Authenticator, TokenError, shared_authenticator
from .totp import Enrolment, SecretSource, TotpGuard, TotpResult, ValkeySecrets, enrol, revoke

__all__ = [
    "Authenticator",
    "ClientResolver",
    "Enrolment",
    "KeySource",
    "SecretSource",
    "TokenError",
    "TotpGuard",
    "TotpResult",
    "ValkeySecrets",
    "bearer_challenge",
    "enrol",
    "fetch_jwks",
    "revoke",
    "shared_authenticator",
]
