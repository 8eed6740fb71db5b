"""Ids unique across processes and forks: what requests, tokens and locks are named by."""

from __future__ import annotations

import os
import re
import secrets

import pytest

from policyroute._ids import IDS, UniqueIds

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_an_id_is_32_hex_digits_a_per_process_prefix_then_a_counter() -> None:
    ids = UniqueIds()
    made = [ids.next() for _ in range(1000)]
    assert all(HEX32.fullmatch(i) for i in made)
    assert len(set(made)) == 1000
    assert {i[:20] for i in made} == {ids.prefix}
    assert [int(i[20:], 16) for i in made] == list(range(1, 1001))


def test_a_prefix_with_leading_zeros_keeps_every_digit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "token_hex", lambda n: "00" * n)
    ids = UniqueIds()
    assert ids.next() == "0" * 31 + "1"
    assert ids.next() == "0" * 31 + "2"


def test_a_forked_child_never_repeats_its_parent_s_ids() -> None:
    before = IDS.next()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, " ".join(IDS.next() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [IDS.next() for _ in range(3)]
    assert len(child) == 3
    assert {c[:20] for c in child}.isdisjoint({before[:20]})
    assert set(child).isdisjoint(parent)
    assert all(HEX32.fullmatch(c) for c in child)


def test_threads_drawing_at_once_never_share_an_id() -> None:
    """Ids are made a block at a time: threads that empty a block together each take a
    block of their own, and no id is handed out twice."""
    import threading

    ids = UniqueIds()
    made: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def draw(out: list[str]) -> None:
        start.wait()
        for _ in range(5_000):
            out.append(ids.next())

    threads = [threading.Thread(target=draw, args=(out,)) for out in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in made for i in out]
    assert len(every) == 40_000 and len(set(every)) == 40_000
    assert all(HEX32.fullmatch(i) and i[:20] == ids.prefix for i in every)
