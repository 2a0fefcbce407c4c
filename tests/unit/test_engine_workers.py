"""portproxy.engine with worker loops: bulky connections moved to other threads, on loopback.

Every connection starts on the main loop; one that moves ``BULK_BYTES`` is placed once,
on the loop with the fewest connections.  These tests check that the bytes, the counters,
``remove`` and ``close`` are the same whichever loop holds a connection (127.0.0.1 only;
no namespace needed).
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from typing import TypeVar

import pytest
from helpers.relay import info, on_engine, wait_for

from portproxy._tcpio import BULK_BYTES, TcpRelay
from portproxy.engine import Engine, RelayInfo, default_workers

T = TypeVar("T")
LO = "127.0.0.1"


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """An echo server on loopback, a thread per connection."""
    server = socket.create_server((LO, 0))
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            thread = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield server.getsockname()
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    acceptor.join(5)
    for thread in threads:
        thread.join(5)


class Running:
    """An engine with ``workers`` worker loops, running on a thread."""

    def __init__(self, workers: int) -> None:
        self.engine = Engine(connect_timeout=2.0, workers=workers)
        self.thread = threading.Thread(target=self.engine.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.engine.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def running() -> Iterator[Running]:
    run = Running(workers=2)
    try:
        yield run
    finally:
        if run.thread.is_alive():
            run.stop()
        run.engine.close()


def add_tcp(engine: Engine, target: tuple[str, int]) -> tuple[TcpRelay, int]:
    listener = socket.socket()
    listener.bind((LO, 0))
    relay = on_engine(engine, lambda: engine.add_tcp(listener, target, name="echo"))
    assert isinstance(relay, TcpRelay)
    return relay, listener.getsockname()[1]


def loads(relay: TcpRelay) -> list[int]:
    """How many of the relay's connections each loop holds, main loop first."""
    engine = relay.engine
    assert isinstance(engine, Engine)
    loops = [engine.loop, *engine.loops]
    with relay._lock:
        return [sum(1 for c in relay.conns if c.loop is loop) for loop in loops]


def reset_or_eof(sock: socket.socket) -> bool:
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def exchange(sock: socket.socket, payload: bytes) -> None:
    """Send ``payload`` through the echo relay and check that all of it comes back."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    got = bytearray()
    while len(got) < len(payload):
        data = sock.recv(1 << 20)
        assert data
        got += data
    sender.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


BULK = bytes(range(256)) * (BULK_BYTES // 256 // 2 + 4096)   # up and back: > BULK_BYTES


def connect_all(port: int, count: int) -> list[socket.socket]:
    socks = [socket.create_connection((LO, port), timeout=10) for _ in range(count)]
    for sock in socks:
        exchange(sock, b"x")
    return socks


def test_small_connections_stay_on_the_main_loop(
        running: Running, echo_server: tuple[str, int]) -> None:
    relay, port = add_tcp(running.engine, echo_server)
    socks = connect_all(port, 4)
    try:
        assert loads(relay) == [4, 0, 0]
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: info(running.engine).connections == 0, "the connections to end")


def test_bulky_connections_spread_over_the_loops_and_carry_every_byte(
        running: Running, echo_server: tuple[str, int]) -> None:
    relay, port = add_tcp(running.engine, echo_server)
    socks = connect_all(port, 6)
    try:
        for sock in socks:
            exchange(sock, BULK)
        wait_for(lambda: loads(relay) == [2, 2, 2], "the connections to move")
        for sock in socks:                      # and they go on relaying where they are
            exchange(sock, BULK[:100_000])
        assert info(running.engine).connections == 6
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: info(running.engine).connections == 0, "the connections to end")
    each = 6 * (1 + len(BULK) + 100_000)        # every byte counted, wherever it moved
    assert info(running.engine) == RelayInfo("echo", "tcp", (LO, port), echo_server, 0, 6,
                                             0, 0, bytes_up=each, bytes_down=each)
    assert [running.engine.load(loop) for loop in running.engine.loops] == [0, 0]


def moved(relay: TcpRelay, port: int, count: int) -> tuple[TcpRelay, list[socket.socket]]:
    """``count`` bulky connections through ``relay`` on ``port``, one moved at least."""
    socks = connect_all(port, count)
    for sock in socks:
        exchange(sock, BULK)
    wait_for(lambda: sum(loads(relay)[1:]) >= 1, "a connection to move")
    return relay, socks


def test_remove_resets_connections_on_every_loop(
        running: Running, echo_server: tuple[str, int]) -> None:
    relay, port = add_tcp(running.engine, echo_server)
    relay, socks = moved(relay, port, 3)
    on_engine(running.engine, lambda: running.engine.remove(relay))
    for sock in socks:
        assert reset_or_eof(sock)
        sock.close()
    wait_for(lambda: not relay.conns, "the connections to be dropped")
    assert running.engine.relays() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LO, port), timeout=10)


def test_close_after_stop_resets_what_the_workers_hold(
        running: Running, echo_server: tuple[str, int]) -> None:
    relay, port = add_tcp(running.engine, echo_server)
    relay, socks = moved(relay, port, 3)
    running.stop()
    assert all(not t.is_alive() for t in threading.enumerate()
               if t.name.startswith("engine-worker"))
    running.engine.close()
    for sock in socks:
        assert reset_or_eof(sock)
        sock.close()
    assert not relay.conns


def test_the_engine_runs_again_with_its_workers(echo_server: tuple[str, int]) -> None:
    run = Running(workers=1)
    try:
        relay, port = add_tcp(run.engine, echo_server)
        relay, socks = moved(relay, port, 1)
        assert loads(relay) == [0, 1]
        run.stop()
        run.thread = threading.Thread(target=run.engine.run, daemon=True)
        run.thread.start()
        exchange(socks[0], BULK[:100_000])
        socks[0].close()
        wait_for(lambda: not relay.conns, "the connection to end")
        run.stop()
    finally:
        run.engine.close()


def test_no_workers_keeps_everything_on_one_thread(echo_server: tuple[str, int]) -> None:
    run = Running(workers=0)
    try:
        relay, port = add_tcp(run.engine, echo_server)
        socks = connect_all(port, 2)
        for sock in socks:
            exchange(sock, BULK)
        assert loads(relay) == [2]
        for sock in socks:
            sock.close()
        wait_for(lambda: not relay.conns, "the connections to end")
        assert run.engine.bulk == 0
        run.stop()
    finally:
        run.engine.close()


def test_worker_count() -> None:
    assert 0 <= default_workers() <= 3
    assert Engine(workers=2).workers == 2
    with pytest.raises(ValueError):
        Engine(workers=-1)
