"""portproxy.loop: the public API of one loop (readers, writers, raw fds, callbacks) and
the ready queue's snapshot per round (socketpairs on the test process; no namespace)."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator

import pytest

from portproxy.loop import Loop


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop(name="test")
    thread = threading.Thread(target=lp.run, name="test-loop", daemon=True)
    thread.start()
    assert lp.wait_running(10)
    try:
        yield lp
    finally:
        lp.stop()
        thread.join(10)
        assert not thread.is_alive()
        lp.close()


def on_loop(loop: Loop, fn: object) -> None:
    done = threading.Event()

    def call() -> None:
        assert callable(fn)
        fn()
        done.set()

    loop.call_soon_threadsafe(call)
    assert done.wait(10)


def test_a_self_rescheduling_callback_does_not_starve_io(loop: Loop) -> None:
    a, b = socket.socketpair()
    spins = [0]
    read = threading.Event()

    def spin() -> None:                  # asks to run again at once, forever
        spins[0] += 1
        loop.call_soon(spin)

    def on_readable() -> None:
        a.recv(100)
        read.set()

    with a, b:
        on_loop(loop, lambda: loop.add_reader(a, on_readable))
        loop.call_soon_threadsafe(spin)
        b.send(b"x")
        assert read.wait(10), "the reader never ran: the ready queue starved I/O"
        on_loop(loop, lambda: loop.remove_reader(a))
    assert spins[0] >= 1


def test_callbacks_queued_in_a_round_run_in_the_next_one() -> None:
    loop = Loop()
    order: list[str] = []

    def first() -> None:
        order.append("first")
        loop.call_soon(lambda: order.append("later"))

    loop.call_soon(first)
    loop.call_soon(lambda: order.append("second"))
    loop.open()
    try:
        loop.run_once()
        assert order == ["first", "second"]
        loop.run_once()
        assert order == ["first", "second", "later"]
    finally:
        loop.close()


def test_a_self_rescheduling_threadsafe_callback_does_not_starve_timers(loop: Loop) -> None:
    fired = threading.Event()

    def spin() -> None:
        loop.call_soon_threadsafe(spin)

    on_loop(loop, lambda: loop.call_later(0.05, fired.set))
    loop.call_soon_threadsafe(spin)
    assert fired.wait(10), "the timer never ran"


def test_a_reader_and_a_writer_on_one_fd(loop: Loop) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    wrote = threading.Event()
    got: list[bytes] = []
    read = threading.Event()

    def on_writable() -> None:
        a.send(b"ping")
        loop.remove_writer(a)           # level-triggered: else called while writable
        wrote.set()

    def on_readable() -> None:
        got.append(a.recv(100))
        read.set()

    with a, b:
        on_loop(loop, lambda: loop.add_reader(a, on_readable))
        on_loop(loop, lambda: loop.add_writer(a, on_writable))
        assert wrote.wait(10)
        assert b.recv(100) == b"ping"
        b.send(b"pong")
        assert read.wait(10) and got == [b"pong"]
        on_loop(loop, lambda: loop.add_writer(a, lambda: None))
        with pytest.raises(ValueError, match="registered already"):
            loop.add_writer(a, lambda: None)
        with pytest.raises(FileExistsError):      # epoll's own refusal
            loop.add(a, select.EPOLLIN, lambda _mask: None)
        assert loop.remove_writer(a) and not loop.remove_writer(a)
        assert loop.remove_reader(a) and not loop.remove_reader(a)
        assert not loop.remove(a)


def test_add_modify_remove_with_a_mask(loop: Loop) -> None:
    a, b = socket.socketpair()
    masks: list[int] = []
    seen = threading.Event()

    def handler(mask: int) -> None:
        masks.append(mask)
        loop.modify(a, 0)               # nothing more until asked again
        seen.set()

    with a, b:
        on_loop(loop, lambda: loop.add(a, select.EPOLLOUT, handler))
        assert seen.wait(10) and masks[0] & select.EPOLLOUT
        seen.clear()
        b.send(b"x")
        on_loop(loop, lambda: loop.modify(a, select.EPOLLIN))
        assert seen.wait(10) and masks[-1] & select.EPOLLIN
        result: list[bool] = []
        on_loop(loop, lambda: result.append(loop.remove(a)))
        assert result == [True]


def test_drain_runs_what_a_stopped_loop_was_handed() -> None:
    loop = Loop()
    ran: list[int] = []

    def first() -> None:
        ran.append(1)
        loop.call_soon(lambda: ran.append(2))

    loop.call_soon_threadsafe(first)
    loop.drain()
    assert ran == [1, 2]
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.open()
