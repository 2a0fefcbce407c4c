"""The relay engine: an epoll loop per thread, non-blocking sockets, no thread per connection.

Theory of operation
-------------------
:meth:`Engine.run` loops: wait in ``epoll_wait`` (until the next timer at most), call the
handler of every ready fd, then the deferred work, the due timers and the callbacks
queued from other threads.  Only a loop's thread touches its sockets; ``stop`` and
``call_soon_threadsafe`` are the two thread-safe entry points and wake the loop through
an eventfd.  An exception from one handler or callback is logged and the loop goes on.

Worker loops: an engine made with ``workers=N`` runs N more loops in threads while
:meth:`Engine.run` runs (they stop when it returns).  A worker is an internal
:class:`Engine` without relays of its own.  Listeners, UDP, readers, timers and callbacks
stay on the main loop, and so does every TCP connection at first: short connections and
interactive ones never pay a hand-off.  A connection that proves bulky (it moved
``BULK_BYTES`` or spent its pump budget) is placed once: it moves to the worker holding
the fewest connections unless the main loop holds fewer bulky ones (``_place_bulk``).
The main thread unregisters its sockets and hands it over through the worker's
``call_soon_threadsafe``; from then on only that worker's thread touches it.  ``splice``
releases the GIL, so the kernel's TCP work of bulky connections runs on several CPUs.
A relay's counters and connection set are shared: the relay guards them with a lock.
Removing a relay posts the resets of connections on running workers to their loops;
once the workers are stopped (``close``), it resets them directly.

Triggering: TCP connections register both sockets once, edge-triggered for in, out and
peer hang-up, and never modify the registration (a bulky connection moving to a worker
registers them once more, there).  Each connection keeps the readiness
it has seen (readable, writable per socket) and clears it only on EAGAIN; whether a
socket is *read* is decided by the pure state (``portproxy.tcp``): a half whose buffer
is full does not read its source -- the edge-triggered form of turning EPOLLIN off --
until its sink drained some bytes.  This costs no ``epoll_ctl`` when a direction blocks
or unblocks, which under bulk transfer happens all the time.  A busy connection moves at
most a budget of rounds per wake-up and then yields to the others (it is *deferred*:
run again after the next, non-blocking, poll).  Listening sockets, UDP sockets and
:meth:`Engine.add_reader` fds are level-triggered and read in bounded batches.

An fd closed by one handler may be reused by a socket made by the next one, in the same
batch of events: events for an fd registered after the batch was read are skipped (epoll
reports the new file again on the next wait if it is ready).

Loops: the local address of every TCP connection the engine dials in its own namespace
(the default ``dial``) is kept in a table while it lives.  A client accepted from one of
those addresses, at the address that connection dialed (the whole 4-tuple), is the
engine's own connection; it carries the relays it went through,
and one arriving at a relay it already went through is a loop: it is reset at once
(which resets the chain behind it) and counted.

Ownership: the engine owns every socket handed to ``add_tcp``/``add_udp`` and closes it
on ``remove`` or ``close``; fds given to ``add_reader`` stay the caller's.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from portproxy._buffers import DEFAULT_BUFFER_SIZE, DEFAULT_PIPE_SIZE, PipePool
from portproxy._relay import Address, Relay, RelayInfo, check_address
from portproxy._tcpio import DEFAULT_CONNECT_TIMEOUT, Connection, Dial, TcpRelay, dial_tcp
from portproxy._udpio import UdpRelay, dial_udp
from portproxy.udp import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FLOWS

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "Engine",
    "Relay",
    "RelayInfo",
    "TimerHandle",
    "dial_tcp",
    "dial_udp",
]

log = logging.getLogger(__name__)

MAX_EVENTS = 1024
MAX_WORKERS = 3         # worker loops by default at most (one per CPU beyond the first)
_COMPACT_AT = 1024      # cancelled timers tolerated in the heap before it is rebuilt


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


class TimerHandle:
    """A callback due at ``when`` (engine clock); ``cancel()`` before it runs to drop it."""

    __slots__ = ("_engine", "_fn", "cancelled", "when")

    def __init__(self, engine: Engine, when: float, fn: Callable[[], object]) -> None:
        self._engine = engine
        self.when = when
        self._fn: Callable[[], object] | None = fn
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._fn = None
            self._engine._timer_cancelled()

    def _run(self) -> None:
        fn, self._fn = self._fn, None
        self.cancelled = True
        if fn is not None:
            fn()


class Engine:
    """Relays TCP and UDP on one epoll loop.  The constructor does no I/O.

    ``connect_timeout`` (s) bounds a TCP connect to the target; ``pipe_size`` is the
    size of the splice pipe of each direction of a connection, ``buffer_size`` that of the
    copy buffer used where splice is refused (memory per connection is bounded by two of
    them); ``splice=False`` copies always.  ``udp_idle_timeout`` and ``udp_max_flows``
    are the defaults of :meth:`add_udp`; ``tcp_idle_timeout`` (0: never) and
    ``tcp_max_connections`` (per listener; 0: no cap) those of :meth:`add_tcp`.  ``clock``
    is monotonic seconds.  ``workers``
    is the number of extra loops (threads) for TCP connections; the default is one per
    CPU beyond the first, at most :data:`MAX_WORKERS`; 0 runs everything on one thread.
    """

    def __init__(self, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 pipe_size: int = DEFAULT_PIPE_SIZE, buffer_size: int = DEFAULT_BUFFER_SIZE,
                 splice: bool = True, udp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 udp_max_flows: int = DEFAULT_MAX_FLOWS, tcp_idle_timeout: float = 0.0,
                 tcp_max_connections: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 workers: int | None = None) -> None:
        if connect_timeout <= 0 or buffer_size < 1:
            raise ValueError("connect_timeout and buffer_size must be positive")
        if workers is not None and workers < 0:
            raise ValueError("workers must not be negative")
        if tcp_idle_timeout < 0 or tcp_max_connections < 0:
            raise ValueError("tcp_idle_timeout and tcp_max_connections must not be negative")
        self.workers = default_workers() if workers is None else workers
        self.connect_timeout = connect_timeout
        self.buffer_size = buffer_size
        self.splice = splice
        self.udp_idle_timeout = udp_idle_timeout
        self.udp_max_flows = udp_max_flows
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_max_connections = tcp_max_connections
        self.now = clock
        self.pipes = PipePool(pipe_size)
        self._epoll: select.epoll | None = None
        self._wake_fd = -1
        self._wake_lock = threading.RLock()   # reentrant: stop() may run in a signal handler
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._fresh: set[int] = set()       # fds (re)registered since the last epoll_wait
        self._readers: set[int] = set()
        self._relays: dict[Relay, None] = {}
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._cancelled = 0
        self._seq = itertools.count()
        self._soon: deque[Callable[[], object]] = deque()
        self._deferred: list[Callable[[], object]] = []
        self._stopping = False
        self._running = False
        self._closed = False
        self._assigned = 0      # TCP connections given to this loop (main thread only)
        self._released = 0      # ... and ended or moved away (this loop's thread only)
        self._bulk = 0          # bulky connections kept on this, the main, loop
        self._loops: list[Engine] = []      # the worker loops, made by the first run()
        self._thread: threading.Thread | None = None    # the one in run()
        self._started = threading.Event()                # set while run() runs
        self._threads: list[threading.Thread] = []
        # local address of each live connection dialed here -> it (see Loops above)
        self._dials: dict[Address, Connection] = {}
        self._dials_lock = threading.Lock()

    # -- relays ------------------------------------------------------------------------

    def add_tcp(self, listen_sock: socket.socket, connect: Address, *, name: str = "",
                dial: Dial | None = None, connect_timeout: float | None = None,
                idle_timeout: float | None = None,
                max_connections: int | None = None) -> Relay:
        """Relay the connections accepted on ``listen_sock`` to ``connect``.

        ``dial(connect)`` returns a non-blocking socket whose connect is under way (it
        may dial in another namespace); the default is :func:`dial_tcp`, whose
        connections are watched for loops.  ``idle_timeout`` (s, 0: never) closes a
        connection idle that long; over ``max_connections`` live connections (0: no
        cap) new ones are reset at once.  The engine owns ``listen_sock`` from now on (it
        calls ``listen()`` if needed).
        """
        connect = check_address(connect)
        idle = self.tcp_idle_timeout if idle_timeout is None else idle_timeout
        cap = self.tcp_max_connections if max_connections is None else max_connections
        if idle < 0 or cap < 0:
            raise ValueError("idle_timeout and max_connections must not be negative")
        relay = TcpRelay(self, listen_sock, connect, name=name or _default_name(connect),
                         dial=dial or dial_tcp,
                         connect_timeout=connect_timeout or self.connect_timeout,
                         idle_timeout=idle, max_connections=cap, track=dial is None)
        return self._add(relay)

    def add_udp(self, bound_sock: socket.socket, connect: Address, *, name: str = "",
                dial: Callable[[Address], socket.socket] | None = None,
                idle_timeout: float | None = None, max_flows: int | None = None) -> Relay:
        """Relay the datagrams reaching ``bound_sock`` to ``connect``, a flow per client.

        ``dial(connect)`` returns a non-blocking datagram socket connected to ``connect``
        (default :func:`dial_udp`).  The engine owns ``bound_sock`` from now on.
        """
        connect = check_address(connect)
        relay = UdpRelay(self, bound_sock, connect, name=name or _default_name(connect),
                         dial=dial or dial_udp,
                         idle_timeout=idle_timeout or self.udp_idle_timeout,
                         max_flows=max_flows or self.udp_max_flows)
        relay.idle_timeout = idle_timeout or self.udp_idle_timeout
        relay.max_connections = max_flows or self.udp_max_flows
        return self._add(relay)

    def _add(self, relay: Relay) -> Relay:
        self._setup()
        try:
            relay.start()
        except BaseException:
            relay.close()
            raise
        self._relays[relay] = None
        return relay

    def remove(self, relay: Relay) -> None:
        """Close ``relay``'s socket and reset its live connections (flows are dropped)."""
        if relay in self._relays:
            del self._relays[relay]
            relay.close()

    def relays(self) -> list[RelayInfo]:
        """Snapshots of every relay, in the order they were added (any thread)."""
        return [relay.info() for relay in list(self._relays)]

    # -- readers, callbacks, timers ----------------------------------------------------

    def add_reader(self, fd: int | _HasFileno, callback: Callable[[], object]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (level-triggered)."""
        fd = fd if isinstance(fd, int) else fd.fileno()
        if fd in self._handlers:
            raise ValueError(f"fd {fd} is registered already")
        def on_readable(_mask: int) -> None:
            callback()

        self._register(fd, select.EPOLLIN, on_readable)
        self._readers.add(fd)

    def remove_reader(self, fd: int | _HasFileno) -> bool:
        """Stop watching ``fd``; False if it was not a reader."""
        fd = fd if isinstance(fd, int) else fd.fileno()
        if fd not in self._readers:
            return False
        self._readers.discard(fd)
        self._unregister(fd)
        return True

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the engine thread soon (from any thread)."""
        self._soon.append(fn)
        self._wake()

    def call_later(self, delay: float, fn: Callable[[], object]) -> TimerHandle:
        """Run ``fn()`` on the engine thread in ``delay`` seconds (engine thread only)."""
        handle = TimerHandle(self, self.now() + max(0.0, delay), fn)
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        return handle

    def _timer_cancelled(self) -> None:
        self._cancelled += 1
        if self._cancelled > _COMPACT_AT and self._cancelled * 2 > len(self._timers):
            self._timers = [t for t in self._timers if not t[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def _defer(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` after the next poll, which will not block (engine thread)."""
        self._deferred.append(fn)

    # -- running -----------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop`; then return, leaving every relay in place."""
        self._setup()
        if self._running:
            raise RuntimeError("the engine is running already")
        self._thread = threading.current_thread()
        self._running = True
        self._started.set()
        try:
            self._start_workers()
            while not self._stopping:
                self._run_once()
        finally:
            self._stop_workers()
            self._running = False
            self._started.clear()
            self._stopping = False

    def stop(self) -> None:
        """Make :meth:`run` return soon (from any thread, or a signal handler)."""
        self._stopping = True
        self._wake()

    def close(self) -> None:
        """Remove every relay and release the engine's own fds.  Not while running."""
        if self._running:
            raise RuntimeError("stop the engine before closing it")
        for loop in self._loops:            # stopped: run what was handed to them last
            loop._drain_soon()
        for relay in list(self._relays):
            self.remove(relay)
        for loop in self._loops:
            loop.close()
        self._loops.clear()
        self.pipes.close()
        with self._wake_lock:
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self._handlers.clear()
        self._readers.clear()
        self._closed = True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run_once(self) -> None:
        assert self._epoll is not None
        timeout = self._poll_timeout()
        events = self._epoll.poll(timeout, MAX_EVENTS)
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
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            for fn in deferred:
                self._call(fn)
        if self._timers:
            self._run_timers()
        self._drain_soon()

    def _drain_soon(self) -> None:
        while self._soon:
            self._call(self._soon.popleft())

    # -- worker loops ------------------------------------------------------------------

    def _start_workers(self) -> None:
        if not self._loops:
            self._loops = [Engine(connect_timeout=self.connect_timeout,
                                  pipe_size=self.pipes.size, buffer_size=self.buffer_size,
                                  splice=self.splice, clock=self.now, workers=0)
                           for _ in range(self.workers)]
        self._threads = [threading.Thread(target=loop.run, name=f"engine-worker-{i}",
                                          daemon=True)
                         for i, loop in enumerate(self._loops)]
        for thread in self._threads:
            thread.start()
        for loop in self._loops:    # from now on, their connections are theirs alone
            loop._started.wait()

    def _stop_workers(self) -> None:
        for loop in self._loops:
            loop.stop()
        for thread in self._threads:
            thread.join()
        self._threads = []

    @property
    def load(self) -> int:
        """TCP connections given to this loop and not yet ended (any thread)."""
        return self._assigned - self._released

    def _place_bulk(self) -> Engine | None:
        """Where a connection of the main loop that turned bulky goes (main thread).

        The worker loop holding the fewest connections, unless the main loop holds fewer
        bulky ones (ties go to a worker: the main loop also accepts); None to stay."""
        best: Engine | None = None
        least = self._bulk
        for loop in self._loops:
            if loop._running and loop.load <= least:
                best, least = loop, loop.load
        if best is None:
            self._bulk += 1
        else:
            best._assigned += 1
        return best

    def _release(self) -> None:
        """A connection given to this loop is over (this loop's thread)."""
        self._released += 1

    def _on_loop_thread(self) -> bool:
        """Whether the caller may touch this loop's connections now."""
        return not self._running or threading.current_thread() is self._thread

    def _poll_timeout(self) -> float:
        if self._deferred or self._soon or self._stopping:
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

    # -- epoll -------------------------------------------------------------------------

    def _setup(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")
        if self._epoll is not None:
            return
        self._epoll = select.epoll()
        with self._wake_lock:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._register(self._wake_fd, select.EPOLLIN, self._on_wake)

    def _on_wake(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_fd >= 0:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(self._wake_fd, 1)

    def _register(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self._setup()
        assert self._epoll is not None
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler
        self._fresh.add(fd)

    def _unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None and self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)


def default_workers() -> int:
    """Worker loops for this machine: one per CPU beyond the first, at most MAX_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(MAX_WORKERS, cpus - 1))


def _default_name(connect: Address) -> str:
    host, port = connect
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
