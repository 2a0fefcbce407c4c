"""Helpers of the relay-engine unit tests: the engine thread, loopback servers, clients."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from portproxy.engine import Engine, RelayInfo

T = TypeVar("T")
LO = "127.0.0.1"


def on_engine(engine: Engine, fn: Callable[[], T], timeout: float = 10) -> T:
    """Run ``fn`` on the engine thread and return its result."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def call() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    engine.call_soon_threadsafe(call)
    return future.result(timeout=timeout)


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if predicate():
            return
        time.sleep(0.025)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def running(engine: Engine) -> Iterator[Engine]:
    """``engine`` run on a thread of its own; stopped, joined and closed afterwards."""
    thread = threading.Thread(target=engine.run, name="engine", daemon=True)
    thread.start()
    try:
        yield engine
    finally:
        engine.stop()
        thread.join(10)
        assert not thread.is_alive()
        engine.close()


def info(engine: Engine) -> RelayInfo:
    (only,) = engine.relays()
    return only


class Server:
    """A TCP server running ``handler(conn)`` per connection on a thread; on loopback,
    or on ``sock`` (listening already, e.g. made in a sandbox namespace)."""

    def __init__(self, handler: Callable[[socket.socket], None],
                 sock: socket.socket | None = None) -> None:
        self.sock = sock if sock is not None else socket.create_server((LO, 0))
        self.address: tuple[str, int] = self.sock.getsockname()
        self.handler = handler
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn)
            except OSError as exc:
                self.errors.append(exc)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._accepting.join(10)
        for thread in self._threads:
            thread.join(30)


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def read_all_then_reply(conn: socket.socket) -> None:
    digest = hashlib.sha256()
    while data := conn.recv(65536):
        digest.update(data)
    conn.sendall(digest.hexdigest().encode() + b"\n" + b"r" * 300_000)


def connect(port: int) -> socket.socket:
    return socket.create_connection((LO, port), timeout=10)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def exchange(client: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` (then FIN) from a thread while reading everything back."""
    def send() -> None:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    got = recv_all(client)
    sender.join(10)
    return got
