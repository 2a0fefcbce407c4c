"""One epoll event loop: fds, a ready queue and timers, run by one thread.

Theory of operation
-------------------
:meth:`Loop.run` goes round: wait in ``epoll_wait`` (until the next timer at most; not at
all while callbacks are ready), call the handler of every ready fd, run the due timers,
then the callbacks that were ready when the round's callbacks began (the queue is
snapshotted, as asyncio's ``ntodo``): a callback queued during a round -- by a handler, a
timer or a callback that reschedules itself -- runs in the next round, after the next
poll, so it cannot starve I/O.  Only the loop's thread touches its fds and timers;
:meth:`Loop.stop` and :meth:`Loop.call_soon_threadsafe` are the thread-safe entry points
and wake the loop through an eventfd.  An exception from a handler or callback is logged
and the loop goes on.

Registration: :meth:`add` watches an fd with an epoll mask of the caller's choosing (edge
triggered or not) and calls ``handler(mask)``; :meth:`modify` changes the mask,
:meth:`remove` stops watching.  :meth:`add_reader` and :meth:`add_writer` are the
level-triggered forms with a plain ``callback()``; an fd may have one reader and one
writer (an error or hang-up calls both, so each sees it on its next system call).

An fd closed by one handler may be reused by a socket made by the next one, in the same
batch of events: events for an fd registered after the batch was read are skipped (epoll
reports the new file again on the next wait if it is ready).  Ownership: fds stay the
caller's; the loop closes only its own epoll and eventfd.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

__all__ = ["MAX_EVENTS", "EventLoop", "FdLike", "Loop", "TimerHandle"]

log = logging.getLogger("portproxy.engine")

MAX_EVENTS = 1024
_COMPACT_AT = 1024      # cancelled timers tolerated in the heap before it is rebuilt
_CLOSE_ROUNDS = 64      # rounds of callbacks a stopped loop runs when it is drained
_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FdLike = int | _HasFileno


class EventLoop(Protocol):
    """What a user of the loop's public API needs: a :class:`Loop`, or an engine's."""

    def now(self) -> float: ...

    def add_reader(self, fd: FdLike, callback: Callable[[], object]) -> None: ...

    def remove_reader(self, fd: FdLike) -> bool: ...

    def add_writer(self, fd: FdLike, callback: Callable[[], object]) -> None: ...

    def remove_writer(self, fd: FdLike) -> bool: ...

    def call_soon(self, fn: Callable[[], object]) -> None: ...

    def call_later(self, delay: float, fn: Callable[[], object]) -> TimerHandle: ...


def _fd(fd: FdLike) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


class TimerHandle:
    """A callback due at ``when`` (loop clock); ``cancel()`` before it runs to drop it."""

    __slots__ = ("_fn", "_loop", "cancelled", "when")

    def __init__(self, loop: Loop, when: float, fn: Callable[[], object]) -> None:
        self._loop = loop
        self.when = when
        self._fn: Callable[[], object] | None = fn
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._fn = None
            self._loop._timer_cancelled()

    def _run(self) -> None:
        fn, self._fn = self._fn, None
        self.cancelled = True
        if fn is not None:
            fn()


class _ReaderWriter:
    """The level-triggered reader and writer of one fd."""

    __slots__ = ("reader", "writer")

    def __init__(self) -> None:
        self.reader: Callable[[], object] | None = None
        self.writer: Callable[[], object] | None = None

    @property
    def mask(self) -> int:
        return ((select.EPOLLIN if self.reader else 0)
                | (select.EPOLLOUT if self.writer else 0))

    def __call__(self, mask: int) -> None:
        if mask & _READ and self.reader is not None:
            self.reader()
        if mask & _WRITE and self.writer is not None:
            self.writer()


class Loop:
    """One epoll loop; see the module docstring.  The constructor does no I/O.

    ``clock`` is monotonic seconds (``now()``); ``name`` names it in logs and threads."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 name: str = "loop") -> None:
        self.now = clock
        self.name = name
        self._epoll: select.epoll | None = None
        self._wake_fd = -1
        self._wake_lock = threading.RLock()   # reentrant: stop() may run in a signal handler
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._rw: dict[int, _ReaderWriter] = {}
        self._fresh: set[int] = set()       # fds (re)registered since the last epoll_wait
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._cancelled = 0
        self._seq = itertools.count()
        self._ready: deque[Callable[[], object]] = deque()
        self._stopping = False
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None    # the one in run()
        self._started = threading.Event()                # set while run() runs

    # -- fds ---------------------------------------------------------------------------

    def add(self, fd: FdLike, events: int, handler: Callable[[int], None]) -> None:
        """Call ``handler(mask)`` when epoll reports ``events`` on ``fd`` (loop thread)."""
        fd = _fd(fd)
        self.open()
        assert self._epoll is not None
        self._epoll.register(fd, events)
        self._handlers[fd] = handler
        self._fresh.add(fd)

    def modify(self, fd: FdLike, events: int) -> None:
        """Watch ``fd`` (added with :meth:`add`) for ``events`` from now on."""
        if self._epoll is not None:
            self._epoll.modify(_fd(fd), events)

    def remove(self, fd: FdLike) -> bool:
        """Stop watching ``fd`` (whatever added it); False if it was not watched."""
        fd = _fd(fd)
        self._rw.pop(fd, None)
        if self._handlers.pop(fd, None) is None:
            return False
        if self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
        return True

    def add_reader(self, fd: FdLike, callback: Callable[[], object]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (level-triggered)."""
        self._set(_fd(fd), callback, writer=False)

    def add_writer(self, fd: FdLike, callback: Callable[[], object]) -> None:
        """Call ``callback()`` whenever ``fd`` is writable (level-triggered)."""
        self._set(_fd(fd), callback, writer=True)

    def remove_reader(self, fd: FdLike) -> bool:
        """Stop calling ``fd``'s reader; False if it had none."""
        return self._unset(_fd(fd), writer=False)

    def remove_writer(self, fd: FdLike) -> bool:
        """Stop calling ``fd``'s writer; False if it had none."""
        return self._unset(_fd(fd), writer=True)

    def _set(self, fd: int, callback: Callable[[], object], *, writer: bool) -> None:
        rw = self._rw.get(fd)
        if rw is None:
            if fd in self._handlers:
                raise ValueError(f"fd {fd} is registered already")
            rw = _ReaderWriter()
        elif (rw.writer if writer else rw.reader) is not None:
            raise ValueError(f"fd {fd} is registered already as a "
                             f"{'writer' if writer else 'reader'}")
        fresh = not rw.mask
        if writer:
            rw.writer = callback
        else:
            rw.reader = callback
        if fresh:
            self.add(fd, rw.mask, rw)
            self._rw[fd] = rw
        else:
            self.modify(fd, rw.mask)

    def _unset(self, fd: int, *, writer: bool) -> bool:
        rw = self._rw.get(fd)
        if rw is None or (rw.writer if writer else rw.reader) is None:
            return False
        if writer:
            rw.writer = None
        else:
            rw.reader = None
        if rw.mask:
            self.modify(fd, rw.mask)
        else:
            self.remove(fd)
        return True

    # -- callbacks and timers ----------------------------------------------------------

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` in the next round, after a poll that does not block (loop thread)."""
        self._ready.append(fn)

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the loop's thread soon (from any thread)."""
        self._ready.append(fn)
        self.wake()

    def call_later(self, delay: float, fn: Callable[[], object]) -> TimerHandle:
        """Run ``fn()`` on the loop's thread in ``delay`` seconds (loop thread only)."""
        handle = TimerHandle(self, self.now() + max(0.0, delay), fn)
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        return handle

    def _timer_cancelled(self) -> None:
        self._cancelled += 1
        if self._cancelled > _COMPACT_AT and self._cancelled * 2 > len(self._timers):
            self._timers = [t for t in self._timers if not t[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    # -- running -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def wait_running(self, timeout: float | None = None) -> bool:
        """Block until :meth:`run` runs (from another thread); whether it does."""
        return self._started.wait(timeout)

    def on_loop_thread(self) -> bool:
        """Whether the caller may touch this loop's fds now (its thread, or not running)."""
        return not self._running or threading.current_thread() is self._thread

    def run(self) -> None:
        """Go round until :meth:`stop`; then return, leaving every fd in place."""
        self.open()
        if self._running:
            raise RuntimeError(f"{self.name} is running already")
        self._thread = threading.current_thread()
        self._running = True
        self._started.set()
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self._running = False
            self._started.clear()
            self._stopping = False

    def stop(self) -> None:
        """Make :meth:`run` return soon (from any thread, or a signal handler)."""
        self._stopping = True
        self.wake()

    def run_once(self) -> None:
        """One round: poll, the ready fds' handlers, due timers, the ready callbacks."""
        assert self._epoll is not None
        events = self._epoll.poll(self._poll_timeout(), MAX_EVENTS)
        handlers, fresh = self._handlers, self._fresh
        fresh.clear()
        for fd, mask in events:
            if fresh and fd in fresh:
                continue        # an event of the fd's previous owner, closed in this batch
            handler = handlers.get(fd)
            if handler is not None:
                try:
                    handler(mask)
                except Exception:
                    log.exception("handler of fd %d failed", fd)
        if self._timers:
            self._run_timers()
        if self._ready:
            self._run_ready()

    def _run_ready(self) -> None:
        ready = self._ready
        for _ in range(len(ready)):         # only what was ready now: the rest next round
            self._call(ready.popleft())

    def drain(self) -> None:
        """Run the callbacks queued on a stopped loop, and those they queue (boundedly)."""
        if self._running:
            raise RuntimeError(f"{self.name} is running")
        for _ in range(_CLOSE_ROUNDS):
            if not self._ready:
                return
            self._run_ready()

    def _poll_timeout(self) -> float:
        if self._ready or self._stopping:
            return 0.0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
            self._cancelled = max(0, self._cancelled - 1)
        if not self._timers:
            return -1.0
        return max(0.0, self._timers[0][0] - self.now())

    def _run_timers(self) -> None:
        now = self.now()
        timers = self._timers
        while timers and timers[0][0] <= now:
            handle = heapq.heappop(timers)[2]
            if handle.cancelled:
                self._cancelled = max(0, self._cancelled - 1)
            else:
                self._call(handle._run)

    @staticmethod
    def _call(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            log.exception("callback %r failed", fn)

    # -- the loop's own fds ------------------------------------------------------------

    def open(self) -> None:
        """Make the epoll and the eventfd (done by the first registration or run)."""
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        if self._epoll is not None:
            return
        self._epoll = select.epoll()
        with self._wake_lock:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.add(self._wake_fd, select.EPOLLIN, self._on_wake)

    def close(self) -> None:
        """Release the epoll and the eventfd.  Not while running."""
        if self._running:
            raise RuntimeError(f"stop {self.name} before closing it")
        with self._wake_lock:
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self._handlers.clear()
        self._rw.clear()
        self._closed = True

    def _on_wake(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)

    def wake(self) -> None:
        """Make a blocked poll return (any thread)."""
        with self._wake_lock:
            if self._wake_fd >= 0:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(self._wake_fd, 1)
