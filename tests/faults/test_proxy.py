"""The FaultProxy itself, in front of the session's Valkey: each fault does what it says."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import valkey

from .proxy import FaultProxy

PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


@pytest.fixture
def proxy(valkey_url: str) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", _port(valkey_url)) as link:
        yield link


def _connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    sock.sendall(PING)
    assert _read(sock, len(PONG)) == PONG
    return sock


def _read(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _silent(sock: socket.socket, seconds: float = 0.3) -> bool:
    """Nothing arrives within `seconds`."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(2)
    return False


def test_pause_holds_bytes_both_ways_and_resume_delivers_them_in_order(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        proxy.pause()
        sock.sendall(PING * 3)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as late:
            late.sendall(PING)  # a connection opened during the pause waits too
            assert _silent(sock) and _silent(late, 0.05)
            proxy.resume()
            assert _read(sock, 3 * len(PONG)) == PONG * 3
            assert _read(late, len(PONG)) == PONG


def test_delay_adds_latency_per_chunk_each_way(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        proxy.delay(0.15)
        started = time.monotonic()
        sock.sendall(PING)
        assert _read(sock, len(PONG)) == PONG
        assert time.monotonic() - started >= 0.3
        proxy.heal()
        started = time.monotonic()
        sock.sendall(PING)
        assert _read(sock, len(PONG)) == PONG
        assert time.monotonic() - started < 0.1


def test_drop_closes_cleanly_and_new_connections_work(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        proxy.drop()
        assert sock.recv(10) == b""  # FIN, not RST
    with _connect(proxy):
        assert proxy.connections == 1


def test_reset_sends_an_rst(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(10)


def test_reset_mid_reply_cuts_after_the_given_bytes(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        proxy.reset(after=5)
        sock.sendall(b"*2\r\n$4\r\nECHO\r\n$20\r\n" + b"x" * 20 + b"\r\n")
        got = b""
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(100):
                got += chunk
        assert got == b"$20\r\n"
    with _connect(proxy):  # without `every`, new connections are not cut
        pass


def test_reset_every_cuts_new_connections_until_heal(proxy: FaultProxy) -> None:
    proxy.reset(after=3, every=True)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
        sock.sendall(PING)
        with pytest.raises(ConnectionResetError):
            while sock.recv(100):
                pass
    proxy.heal()
    with _connect(proxy):
        pass


def test_half_close_ends_the_clients_reads_while_its_writes_still_arrive(
    proxy: FaultProxy, valkey_url: str
) -> None:
    key = "fault-proxy-" + uuid.uuid4().hex
    direct = valkey.Valkey.from_url(valkey_url)
    try:
        with _connect(proxy) as sock:
            proxy.half_close()
            assert sock.recv(10) == b""
            sock.sendall(f"*3\r\n$3\r\nSET\r\n${len(key)}\r\n{key}\r\n$1\r\nv\r\n".encode())
            deadline = time.monotonic() + 2
            while direct.get(key) != b"v" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert direct.get(key) == b"v"
    finally:
        direct.delete(key)
        direct.close()  # type: ignore[no-untyped-call]


def test_blackhole_answers_nothing_and_heal_resets_what_it_swallowed(proxy: FaultProxy) -> None:
    with _connect(proxy) as old:
        proxy.blackhole()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as new:
            new.sendall(PING)
            old.sendall(PING)
            assert _silent(new) and _silent(old, 0.05)
            proxy.heal()
            for sock in (old, new):
                with pytest.raises(ConnectionResetError):
                    sock.recv(10)
    with _connect(proxy):
        pass


async def test_controlled_from_an_async_test(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        proxy.pause()
        writer.write(PING)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(len(PONG)), 0.2)
        proxy.resume()
        assert await asyncio.wait_for(reader.readexactly(len(PONG)), 2) == PONG
    finally:
        writer.close()
        await writer.wait_closed()
