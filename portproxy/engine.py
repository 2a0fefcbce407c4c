"""The relay engine: a pool of epoll loops, non-blocking sockets, no thread per connection.

Theory of operation
-------------------
An :class:`Engine` holds a main :class:`~portproxy.loop.Loop` and, while :meth:`Engine.run`
runs it, N worker loops in threads (they stop when it returns).  Its loop methods
(``add_reader``, ``call_later``, ``call_soon_threadsafe`` ...) are the main loop's.
Listeners, UDP, readers, timers and callbacks stay on the main loop, and so does every TCP
connection at first: short connections and interactive ones never pay a hand-off.  A
connection that proves bulky (it moved ``BULK_BYTES`` or spent its pump budget) is placed
once (:meth:`Engine.place_bulk`): it moves to the worker holding the fewest connections
unless the main loop holds fewer bulky ones.  The main thread removes its sockets from
the main loop and hands it over through the worker's ``call_soon_threadsafe``; from then
on only that worker's thread touches it.  ``splice`` releases the GIL, so the kernel's TCP
work of bulky connections runs on several CPUs.  A relay's counters and connection set
are shared: the relay guards them with a lock.  Removing a relay posts the resets of
connections on running workers to their loops; once the workers are stopped (``close``),
it resets them directly.  Each loop has its own pool of pipes (:meth:`Engine.pipes_of`).

Triggering: TCP connections register both sockets once, edge-triggered for in, out and
peer hang-up, and never modify the registration (a bulky connection moving to a worker
registers them once more, there).  Each connection keeps the readiness
it has seen (readable, writable per socket) and clears it only on EAGAIN; whether a
socket is *read* is decided by the pure state (``portproxy.tcp``): a half whose buffer
is full does not read its source -- the edge-triggered form of turning EPOLLIN off --
until its sink drained some bytes.  This costs no ``epoll_ctl`` when a direction blocks
or unblocks, which under bulk transfer happens all the time.  A busy connection moves at
most a budget of rounds per wake-up and then yields to the others (``call_soon``: run
again in the next round, after a non-blocking poll).  Listening sockets, UDP sockets and
readers are level-triggered and read in bounded batches.

Loops: the local address of every TCP connection the engine dials in its own namespace
(the default ``dial``) is kept in :attr:`Engine.dials` while it lives.  A client accepted
from one of those addresses, at the address that connection dialed (the whole 4-tuple), is
the engine's own connection; it carries the relays it went through, and one arriving at a
relay it already went through is a loop: it is reset at once (which resets the chain
behind it) and counted.

Ownership: the engine owns every socket handed to ``add_tcp``/``add_udp`` and closes it
on ``remove`` or ``close``; fds given to ``add_reader`` stay the caller's.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

from portproxy._buffers import DEFAULT_BUFFER_SIZE, DEFAULT_PIPE_SIZE, PipePool
from portproxy._relay import Address, Relay, RelayInfo, check_address
from portproxy._tcpio import DEFAULT_CONNECT_TIMEOUT, Dial, DialTable, TcpRelay, dial_tcp
from portproxy._udpio import UdpRelay, dial_udp
from portproxy.loop import FdLike, Loop, TimerHandle
from portproxy.udp import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FLOWS

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "Engine",
    "Loop",
    "Relay",
    "RelayInfo",
    "TimerHandle",
    "default_workers",
    "dial_tcp",
    "dial_udp",
]

MAX_WORKERS = 3         # worker loops by default at most (one per CPU beyond the first)


class Engine:
    """Relays TCP and UDP on a pool of epoll loops.  The constructor does no I/O.

    ``connect_timeout`` (s) bounds a TCP connect to the target; ``pipe_size`` is the
    size of the splice pipe of each direction of a connection, ``buffer_size`` that of the
    copy buffer used where splice is refused (memory per connection is bounded by two of
    them); ``splice=False`` copies always.  ``udp_idle_timeout`` and ``udp_max_flows``
    are the defaults of :meth:`add_udp`; ``tcp_idle_timeout`` (0: never) and
    ``tcp_max_connections`` (per listener; 0: no cap) those of :meth:`add_tcp`.  ``clock``
    is monotonic seconds.  ``workers`` is the number of extra loops (threads) for TCP
    connections; the default is one per CPU beyond the first, at most
    :data:`MAX_WORKERS`; 0 runs everything on one thread.
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
        self.loop = Loop(clock=clock, name="engine")
        self.dials = DialTable()
        self._pipe_size = pipe_size
        self._pipes: dict[Loop, PipePool] = {self.loop: PipePool(pipe_size)}
        # TCP connections given to each loop (by the main thread) and ended or moved
        # away (by the loop's thread): two counters, each written by one thread
        self._load: dict[Loop, list[int]] = {self.loop: [0, 0]}
        self._bulk = 0          # bulky connections kept on the main loop
        self._relays: dict[Relay, None] = {}
        self._workers: list[Loop] = []       # made by the first run()
        self._threads: list[threading.Thread] = []

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
        relay = UdpRelay(self.loop, bound_sock, connect, name=name or _default_name(connect),
                         dial=dial or dial_udp,
                         idle_timeout=idle_timeout or self.udp_idle_timeout,
                         max_flows=max_flows or self.udp_max_flows)
        relay.idle_timeout = idle_timeout or self.udp_idle_timeout
        relay.max_connections = max_flows or self.udp_max_flows
        return self._add(relay)

    def _add(self, relay: Relay) -> Relay:
        self.loop.open()
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

    # -- the main loop's API -----------------------------------------------------------

    def add_reader(self, fd: FdLike, callback: Callable[[], object]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (level-triggered, main loop)."""
        self.loop.add_reader(fd, callback)

    def remove_reader(self, fd: FdLike) -> bool:
        """Stop watching ``fd`` for reading; False if it was not a reader."""
        return self.loop.remove_reader(fd)

    def add_writer(self, fd: FdLike, callback: Callable[[], object]) -> None:
        """Call ``callback()`` whenever ``fd`` is writable (level-triggered, main loop)."""
        self.loop.add_writer(fd, callback)

    def remove_writer(self, fd: FdLike) -> bool:
        """Stop watching ``fd`` for writing; False if it was not a writer."""
        return self.loop.remove_writer(fd)

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the main loop in its next round (main thread only)."""
        self.loop.call_soon(fn)

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the engine thread soon (from any thread)."""
        self.loop.call_soon_threadsafe(fn)

    def call_later(self, delay: float, fn: Callable[[], object]) -> TimerHandle:
        """Run ``fn()`` on the engine thread in ``delay`` seconds (engine thread only)."""
        return self.loop.call_later(delay, fn)

    # -- running -----------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop`; then return, leaving every relay in place."""
        self.loop.open()
        if self.loop.running:
            raise RuntimeError("the engine is running already")
        try:
            self._start_workers()
            self.loop.run()
        finally:
            self._stop_workers()

    def stop(self) -> None:
        """Make :meth:`run` return soon (from any thread, or a signal handler)."""
        self.loop.stop()

    def close(self) -> None:
        """Remove every relay and release the engine's own fds.  Not while running."""
        if self.loop.running:
            raise RuntimeError("stop the engine before closing it")
        for loop in self._workers:          # stopped: run what was handed to them last
            loop.drain()
        for relay in list(self._relays):
            self.remove(relay)
        for loop in (*self._workers, self.loop):
            loop.close()
            self._pipes[loop].close()
        self._workers.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the pool of loops -------------------------------------------------------------

    @property
    def loops(self) -> tuple[Loop, ...]:
        """The worker loops (made by the first :meth:`run`)."""
        return tuple(self._workers)

    @property
    def pipes(self) -> PipePool:
        """The main loop's pipes."""
        return self._pipes[self.loop]

    @property
    def bulk(self) -> int:
        """Bulky connections kept on the main loop."""
        return self._bulk

    def pipes_of(self, loop: Loop) -> PipePool:
        """The pipes of ``loop`` (only its thread takes and returns them)."""
        return self._pipes[loop]

    def load(self, loop: Loop) -> int:
        """TCP connections given to ``loop`` and not yet ended (any thread)."""
        assigned, released = self._load[loop]
        return assigned - released

    def assign(self, loop: Loop) -> None:
        """A connection starts on ``loop`` (main thread)."""
        self._load[loop][0] += 1

    def release(self, loop: Loop) -> None:
        """A connection given to ``loop`` is over or moved away (``loop``'s thread)."""
        self._load[loop][1] += 1

    def place_bulk(self) -> Loop | None:
        """Where a connection of the main loop that turned bulky goes (main thread).

        The worker loop holding the fewest connections, unless the main loop holds fewer
        bulky ones (ties go to a worker: the main loop also accepts); None to stay."""
        best: Loop | None = None
        least = self._bulk
        for loop in self._workers:
            load = self.load(loop)
            if loop.running and load <= least:
                best, least = loop, load
        if best is None:
            self._bulk += 1
        else:
            self.assign(best)
        return best

    def bulk_ended(self) -> None:
        """A bulky connection kept on the main loop is over (main thread)."""
        self._bulk -= 1

    def _start_workers(self) -> None:
        if not self._workers:
            for i in range(self.workers):
                loop = Loop(clock=self.now, name=f"engine-worker-{i}")
                self._pipes[loop] = PipePool(self._pipe_size)
                self._load[loop] = [0, 0]
                self._workers.append(loop)
        self._threads = [threading.Thread(target=loop.run, name=loop.name, daemon=True)
                         for loop in self._workers]
        for thread in self._threads:
            thread.start()
        for loop in self._workers:  # from now on, their connections are theirs alone
            loop.wait_running()

    def _stop_workers(self) -> None:
        for loop in self._workers:
            loop.stop()
        for thread in self._threads:
            thread.join()
        self._threads = []


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
