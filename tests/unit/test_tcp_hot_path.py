"""The TCP relay's I/O and its sans-IO state agree: production reports every byte, FIN and
failure to ``TcpConnection`` (no state is changed behind its back), and replaying what it
reported on a fresh state machine gives the same state and the same actions.

Real sockets on loopback through a running engine (no namespace needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers.relay import (
    Server,
    connect,
    echo,
    exchange,
    info,
    read_all_then_reply,
    recv_all,
    running,
    wait_for,
)

from portproxy import _buffers, _tcpconn
from portproxy.engine import Engine
from portproxy.tcp import Action, ConnState, HalfState, TcpConnection

LO = "127.0.0.1"
EVENTS = ("connected", "connect_failed", "tick", "active", "received", "sent", "eof",
          "reset", "fail", "resize")


class Recording(TcpConnection):
    """A TcpConnection that keeps every event reported to it, and what it answered."""

    made: list[Recording] = []
    __slots__ = ("args", "log")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.args = args
        self.log: list[tuple[str, tuple[Any, ...], Any]] = []
        Recording.made.append(self)


def _recorded(name: str) -> Callable[..., Any]:
    method = getattr(TcpConnection, name)

    def call(self: Recording, *args: Any) -> Any:
        result = method(self, *args)
        self.log.append((name, args, list(result) if isinstance(result, list) else result))
        return result

    return call


for _name in EVENTS:
    setattr(Recording, _name, _recorded(_name))


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Recording]]:
    Recording.made = []
    monkeypatch.setattr(_tcpconn, "TcpConnection", Recording)
    yield Recording.made


def replay(rec: Recording) -> TcpConnection:
    """A fresh state machine fed what production reported; its answers must match."""
    fresh = TcpConnection(*rec.args)
    for name, args, answer in rec.log:
        got: Any = getattr(fresh, name)(*args)
        assert got == answer, f"{name}{args}: {got} != {answer}"
    return fresh


def snapshot(conn: TcpConnection) -> tuple[object, ...]:
    return (conn.state, conn.deadline, conn.last_active,
            *[(h.state, h.pending, h.capacity, h.total) for h in conn.halves])


def moved(rec: Recording, event: str, direction: int) -> int:
    return sum(args[1] for name, args, _ in rec.log if name == event and args[0] == direction)


@pytest.mark.parametrize("mode", ["splice", "copy", "fallback"])
def test_production_reports_every_byte_and_the_replay_agrees(
        mode: str, recording: list[Recording], servers: Callable[..., Server],
        monkeypatch: pytest.MonkeyPatch) -> None:
    if mode == "fallback":
        def refuse(*_args: Any) -> int:
            raise OSError(22, "splice refused")
        monkeypatch.setattr(_buffers, "_splice", refuse)
    server = servers(read_all_then_reply)
    with running(Engine(connect_timeout=2.0, workers=0, splice=mode != "copy",
                        pipe_size=64 << 10, buffer_size=64 << 10)) as eng:
        listener = socket.create_server((LO, 0))
        eng.call_soon_threadsafe(lambda: eng.add_tcp(listener, server.address, name="r"))
        wait_for(lambda: len(eng.relays()) == 1, "the relay")
        payload = os.urandom(3 << 20)
        with connect(listener.getsockname()[1]) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            reply = recv_all(client)
        wait_for(lambda: info(eng).connections == 0, "the connection to end")
    digest = hashlib.sha256(payload).hexdigest().encode()
    assert reply.startswith(digest + b"\n")
    (rec,) = recording
    sizes = (len(payload), len(reply))
    for d in (0, 1):
        assert moved(rec, "received", d) == moved(rec, "sent", d) == sizes[d]
        assert rec.halves[d].total == sizes[d] and rec.halves[d].state is HalfState.SHUT
        assert [args for name, args, _ in rec.log if name == "eof"].count((d,)) == 1
    assert rec.state is ConnState.CLOSED
    assert [n for n, _, _ in rec.log].count("resize") == (2 if mode == "fallback" else 0)
    assert snapshot(replay(rec)) == snapshot(rec)


def test_a_reset_mid_stream_is_reported_and_the_replay_agrees(
        recording: list[Recording], servers: Callable[..., Server]) -> None:
    def reset_after_some(conn: socket.socket) -> None:
        conn.recv(1000)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")

    server = servers(reset_after_some)
    with running(Engine(connect_timeout=2.0, workers=0)) as eng:
        listener = socket.create_server((LO, 0))
        eng.call_soon_threadsafe(lambda: eng.add_tcp(listener, server.address, name="r"))
        wait_for(lambda: len(eng.relays()) == 1, "the relay")
        with connect(listener.getsockname()[1]) as client:
            client.sendall(b"x" * 2000)
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(10) == b""
        wait_for(lambda: info(eng).connections == 0, "the connection to end")
    (rec,) = recording
    assert rec.state is ConnState.CLOSED
    assert any(name == "reset" for name, _, _ in rec.log)
    assert all(h.state is HalfState.ABORTED for h in rec.halves)
    assert snapshot(replay(rec)) == snapshot(rec)


def test_echo_through_a_worker_loop_reports_every_byte(
        recording: list[Recording], servers: Callable[..., Server]) -> None:
    server = servers(echo)
    with running(Engine(connect_timeout=2.0, workers=1)) as eng:
        listener = socket.create_server((LO, 0))
        eng.call_soon_threadsafe(lambda: eng.add_tcp(listener, server.address, name="e"))
        wait_for(lambda: len(eng.relays()) == 1, "the relay")
        payload = os.urandom(1 << 20) * 6          # bulky: placed on the worker
        with connect(listener.getsockname()[1]) as client:
            got = exchange(client, payload)
        assert got == payload
        wait_for(lambda: info(eng).connections == 0, "the connection to end")
    (rec,) = recording
    for d in (0, 1):
        assert moved(rec, "received", d) == moved(rec, "sent", d) == len(payload)
    actions: list[Action] = [a for _, _, answer in rec.log if isinstance(answer, list)
                             for a in answer]
    assert actions and snapshot(replay(rec)) == snapshot(rec)
