"""TOTP codes (RFC 6238): the Appendix B vectors and the drift window."""

from __future__ import annotations

import base64

import pytest

from policyroute.identity.totp import STEP_SECONDS, code_at, matching_step

# RFC 6238 Appendix B, SHA-1: the ASCII secret "12345678901234567890", T0 = 0, X = 30 s.
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()
VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("at", "code"), VECTORS)
def test_rfc6238_appendix_b_sha1_vectors(at: int, code: str) -> None:
    assert code_at(RFC_SECRET, at, digits=8) == code


@pytest.mark.parametrize(("at", "code"), VECTORS)
def test_the_vectors_match_their_own_time_step(at: int, code: str) -> None:
    assert matching_step(RFC_SECRET, code, at, digits=8, drift=0) == at // STEP_SECONDS


def test_one_step_of_drift_either_way_and_no_more() -> None:
    at = 1111111111
    step = at // STEP_SECONDS
    for offset in (-1, 1):
        code = code_at(RFC_SECRET, at + offset * STEP_SECONDS, digits=8)
        assert matching_step(RFC_SECRET, code, at, digits=8, drift=1) == step + offset
        assert matching_step(RFC_SECRET, code, at, digits=8, drift=0) is None
    far = code_at(RFC_SECRET, at + 2 * STEP_SECONDS, digits=8)
    assert matching_step(RFC_SECRET, far, at, digits=8, drift=1) is None


FULLWIDTH = "".join(chr(0xFF10 + int(d)) for d in "94287082")  # digits, but not ASCII ones


@pytest.mark.parametrize("code", ["", "9428708", "942870820", "9428708a", FULLWIDTH, " 94287082"])
def test_malformed_codes_match_nothing(code: str) -> None:
    assert matching_step(RFC_SECRET, code, 59, digits=8, drift=1) is None
