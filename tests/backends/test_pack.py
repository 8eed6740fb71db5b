"""The RESP packer: the bytes libvalkey's packer makes, remembered text included."""

from __future__ import annotations

import enum
from collections.abc import Iterator

import libvalkey
import pytest

from policyroute.backends import pipeline
from policyroute.backends.pipeline import Arg, fragment, pack, pin, remember, wire


class Color(enum.StrEnum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 7


VALUES: list[Arg] = [
    "", "a", "tb", "é", "ü" * 600, "x" * 1023, "x" * 1024, "x" * 5000,
    b"", b"\x00\xff\r\n", b"y" * 1024, bytes(range(256)),
    0, 1, 9, 10, 1023, 1024, -1, -1024, 2**63, -(2**70), 1796459059834,
    0.1, -2.5, 1e20, 1e-7, Color.RED,
]  # fmt: skip


@pytest.fixture
def small_memo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A memo of 8 fragments, empty at first (what other tests pinned is put back after)."""
    pinned, fragments = dict(pipeline._PINNED), dict(pipeline._FRAGMENTS)
    pipeline._PINNED.clear()
    pipeline._FRAGMENTS.clear()
    monkeypatch.setattr(pipeline, "FRAGMENT_MEMO", 8)
    yield
    pipeline._PINNED.clear()
    pipeline._PINNED.update(pinned)
    pipeline._FRAGMENTS.clear()
    pipeline._FRAGMENTS.update(fragments)


def test_every_argument_packs_as_libvalkey_packs_it() -> None:
    for value in VALUES:
        assert pack(("ECHO", value)) == libvalkey.pack_command(("ECHO", value)), value
    assert pack(tuple(VALUES)) == libvalkey.pack_command(tuple(VALUES))
    assert pack(tuple(range(1500))) == libvalkey.pack_command(tuple(range(1500)))


def test_types_the_c_packer_refuses_are_spelled_as_valkey_py_spells_them() -> None:
    assert pack((True, False, Size.BIG)) == b"*3\r\n$1\r\n1\r\n$1\r\n0\r\n$1\r\n7\r\n"
    with pytest.raises(TypeError):  # compiled, the argument type check says so first
        pack(("ECHO", None))  # type: ignore[arg-type]


def test_remembered_text_packs_the_same_and_the_memo_starts_again_at_its_bound(
    small_memo: None,
) -> None:
    pin(["pinned-for-good"])
    texts = [f"pr:{{s:user{i}}}:credits" for i in range(30)]
    for text in texts:
        remember(text)
        assert len(pipeline._FRAGMENTS) <= 8 + 1
    for text in [*texts, "pinned-for-good", "ab", "abcdefgh", "abcdefghi"]:
        assert pack((text, text)) == libvalkey.pack_command((text, text))
    # What was pinned outlives every new start; short text is remembered once packed.
    assert "pinned-for-good" in pipeline._FRAGMENTS
    assert pipeline._FRAGMENTS.get("abcdefgh") == fragment("abcdefgh")
    assert "abcdefghi" not in pipeline._FRAGMENTS  # longer: likely a one-off (a token id)


def test_wired_arguments_are_spelled_once_and_pinned() -> None:
    spelled = wire(("tb", 100_000_000, 0.5, b"raw"))
    assert spelled == ("tb", "100000000", "0.5", b"raw")
    assert pipeline._PINNED["100000000"] == b"$9\r\n100000000\r\n"
    assert pack(spelled) == libvalkey.pack_command(spelled)


def test_wired_arguments_of_text_and_number_subtypes_are_spelled_as_packed() -> None:
    # One spelling for `wire` and the packer: a StrEnum is its text (it once raised here).
    assert wire((Color.RED, Size.BIG, True)) == ("red", "7", "1")
    assert pack(wire((Color.RED, Size.BIG, True))) == pack((Color.RED, Size.BIG, True))
