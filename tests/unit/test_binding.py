"""Listen with retry (hns.daemon.binding): tried again every interval, the error kept and
logged once per change, nothing after cancel."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any, cast

import pytest

from hns.daemon.binding import Retrying


class Timers:
    """The engine's ``call_later``, driven by hand."""

    def __init__(self) -> None:
        self.due: list[tuple[float, Callable[[], None], Any]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        handle = _Handle()
        self.due.append((delay, callback, handle))
        return handle

    def fire(self) -> float:
        delay, callback, handle = self.due.pop(0)
        if not handle.cancelled:
            callback()
        return delay


class _Handle:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def retrying(outcomes: list[OSError | None]) -> tuple[Retrying, Timers, list[int]]:
    timers, calls = Timers(), []

    def attempt() -> None:
        calls.append(1)
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    binding = Retrying(cast(Any, timers), "proxy p: cannot listen", attempt, 2.0)
    return binding, timers, calls


def test_a_free_port_is_bound_at_once() -> None:
    binding, timers, calls = retrying([None])
    binding.start()
    assert calls == [1] and binding.error is None and timers.due == []


def test_a_taken_port_is_tried_again_every_interval_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    in_use = OSError(errno.EADDRINUSE, "in use")
    binding, timers, calls = retrying([in_use, in_use, in_use, None])
    with caplog.at_level(logging.WARNING, "hns.daemon"):
        binding.start()
        assert binding.error == "Address already in use"
        assert [timers.fire(), timers.fire()] == [2.0, 2.0]
        assert binding.error == "Address already in use"
        timers.fire()
    assert len(calls) == 4 and binding.error is None and timers.due == []
    assert caplog.messages == [
        "proxy p: cannot listen: Address already in use (retrying every 2s)"]


def test_a_new_error_is_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    binding, timers, _ = retrying([OSError(errno.EADDRINUSE, "x"),
                                   OSError(errno.EADDRNOTAVAIL, "y")])
    with caplog.at_level(logging.WARNING, "hns.daemon"):
        binding.start()
        timers.fire()
    assert len(caplog.messages) == 2
    assert binding.error == "Cannot assign requested address"


def test_nothing_is_tried_after_cancel() -> None:
    binding, timers, calls = retrying([OSError(errno.EADDRINUSE, "x"), None])
    binding.start()
    binding.cancel()
    timers.fire()
    assert calls == [1]
