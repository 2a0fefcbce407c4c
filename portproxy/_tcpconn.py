"""One relayed TCP connection's I/O: its two sockets, two buffers and readiness.

Theory of operation: a :class:`Connection` registers both sockets edge-triggered and keeps
what epoll reported (readable, writable) per socket until a system call says EAGAIN.
Every byte count and every decision goes through its sans-IO state
(:class:`portproxy.tcp.TcpConnection`): a source is read only while its half
``wants_read()``, each read is reported with ``received``, each write with ``sent``, a
FIN with ``eof``, a failure with ``reset``; the actions returned are carried out by
:meth:`Connection._apply`.  :meth:`Connection.pump` moves both directions in rounds --
fill a half's buffer from its source, drain it to its sink -- until a round moves
nothing, or until a budget of rounds is spent, when it yields with ``call_soon`` so other
connections get their turn.

A short read empties the socket, so the readable mark is dropped without the read that
would only say EAGAIN (new bytes bring a new edge) -- except once the peer's FIN or an
error was reported: a FIN that came with the last bytes brings no new edge, so from then
on the source is read until it says EOF.  A splice is short also when the pipe is full
(pipe capacity counts page slots, not bytes), so its shortcut holds only while the pipe
holds fewer bytes than it has slots; and a splice that fails with EAGAIN while the pipe
holds bytes is ambiguous too, so the readable mark is kept: the next drain of the pipe
leads to another try, which settles it.  EINVAL from splice switches that half to
copying (``resize``).  Every other error of a read or write is a reset of that side.

A connection starts on the engine's main loop; once bulky it asks the engine where to go
(``place_bulk``) and moves there at most once (see ``portproxy.engine``).  With an idle
timeout it has one timer, re-armed only when it fires early (the pump notes the time it
last moved bytes, once per wake-up).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
from typing import Protocol

from portproxy._buffers import PipePool, Way
from portproxy._relay import Address
from portproxy.loop import Loop, TimerHandle
from portproxy.tcp import (
    Abort,
    Action,
    Close,
    ConnState,
    Finished,
    Outcome,
    ShutdownWrite,
    Side,
    TcpConnection,
)

__all__ = ["BULK_BYTES", "PUMP_ROUNDS", "Connection", "Owner", "Pool", "nodelay", "reset"]

log = logging.getLogger("portproxy.engine")

PUMP_ROUNDS = 16           # rounds a connection moves per wake-up before it yields
BULK_BYTES = 4 << 20       # bytes after which a connection may move to a worker loop
_ET_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_IN_MASK = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OUT_MASK = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_ERR_MASK = select.EPOLLERR
_HUP_MASK = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_CONNECT_MASK = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_LINGER_RESET = struct.pack("ii", 1, 0)
_CONNECTING = ConnState.CONNECTING


def reset(sock: socket.socket) -> None:
    """Close ``sock`` so that the peer gets a RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on an IP socket (small writes go out at once)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Pool(Protocol):
    """What a connection needs of the engine: its loops, their pipes and load."""

    @property
    def loop(self) -> Loop: ...

    @property
    def buffer_size(self) -> int: ...

    @property
    def splice(self) -> bool: ...

    def pipes_of(self, loop: Loop) -> PipePool: ...

    def assign(self, loop: Loop) -> None: ...

    def release(self, loop: Loop) -> None: ...

    def place_bulk(self) -> Loop | None: ...

    def bulk_ended(self) -> None: ...


class Owner(Protocol):
    """What a connection needs of its relay."""

    @property
    def engine(self) -> Pool: ...

    @property
    def name(self) -> str: ...

    @property
    def connect(self) -> Address: ...

    @property
    def connect_timeout(self) -> float: ...

    @property
    def idle_timeout(self) -> float: ...

    def forget(self, conn: Connection) -> None: ...

    def finished(self, conn: Connection, outcome: Outcome, err: int) -> None: ...


class Connection:
    """The sockets, buffers and readiness of one relayed connection."""

    __slots__ = ("closed", "dial_key", "fds", "hup", "loop", "path", "placed", "rd", "relay",
                 "socks", "state", "timer", "ways", "wr")

    def __init__(self, relay: Owner, client: socket.socket, target: socket.socket) -> None:
        pool = relay.engine
        loop = pool.loop                  # the loop whose thread runs it (moves if bulky)
        self.relay = relay
        self.loop = loop
        self.socks = (client, target)
        self.fds = (client.fileno(), target.fileno())
        self.rd = [False, False]          # readiness seen and not yet used up, per Side
        self.wr = [False, False]
        self.hup = [False, False]         # the peer's FIN (or an error) was reported
        pipes = pool.pipes_of(loop)
        self.ways = (Way(pipes, pool.buffer_size, pool.splice),
                     Way(pipes, pool.buffer_size, pool.splice))
        self.state = TcpConnection(loop.now(), relay.connect_timeout,
                                   self.ways[0].capacity, relay.idle_timeout)
        self.dial_key: Address | None = None   # its local address, while watched for loops
        self.path: frozenset[object] = frozenset()   # the relays it came through
        self.closed = False
        self.placed = False               # whether it was found bulky and placed
        self.timer: TimerHandle | None = None
        loop.add(self.fds[0], _ET_MASK, self._on_client)
        try:
            loop.add(self.fds[1], _ET_MASK, self._on_target)
        except OSError:
            loop.remove(self.fds[0])
            raise
        self.timer = loop.call_later(relay.connect_timeout, self._on_timeout)
        pool.assign(loop)

    # -- events ------------------------------------------------------------------------

    def _on_client(self, mask: int) -> None:
        self._on_event(0, mask)

    def _on_target(self, mask: int) -> None:
        self._on_event(1, mask)

    def _on_event(self, side: int, mask: int) -> None:
        if self.closed:
            return
        try:
            if mask & _IN_MASK:
                self.rd[side] = True
            if mask & _OUT_MASK:
                self.wr[side] = True
            if mask & _HUP_MASK:
                self.hup[side] = True
            if self.state.state is _CONNECTING:
                if side == 1 and mask & _CONNECT_MASK:
                    self._check_connected()
                elif mask & _ERR_MASK:
                    self._check_error(side)
                return
            self.pump()
            if mask & _ERR_MASK and not self.closed:
                self._check_error(side)
        except Exception:
            log.exception("%s: connection failed", self.relay.name)
            self._apply(self.state.fail())

    def _check_connected(self) -> None:
        target = self.socks[1]
        err = target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._apply(self.state.connect_failed(err))
            return
        try:
            target.getpeername()
        except OSError:
            return                       # still connecting: a stale event of a reused fd
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        nodelay(target)
        self._apply(self.state.connected(self.loop.now()))
        if self.relay.idle_timeout:
            self.timer = self.loop.call_later(self.relay.idle_timeout, self._on_timeout)
        self.pump()

    def _check_error(self, side: int) -> None:
        err = self.socks[side].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._apply(self.state.reset(Side(side), err))

    def _on_timeout(self) -> None:
        """The connect deadline or the idle timeout may have passed; else wait again."""
        self.timer = None
        if self.closed:
            return
        now = self.loop.now()
        actions = self.state.tick(now)
        if actions:
            self._apply(actions)
            return
        due = self.state.due()
        if due is not None:                  # early, or bytes moved since it was armed
            self.timer = self.loop.call_later(due - now, self._on_timeout)

    def kill(self) -> None:
        """Reset both sides now (the relay is being removed)."""
        if not self.closed:
            self._apply(self.state.fail())

    # -- moving bytes ------------------------------------------------------------------

    def pump(self) -> None:
        """Move bytes both ways until nothing moves or the budget is spent."""
        idle = self.relay.idle_timeout
        for _ in range(PUMP_ROUNDS):
            moved = self._move(0)
            moved += self._move(1)
            if moved and idle:
                self.state.active(self.loop.now())
                idle = 0.0                      # once per wake-up is precise enough
            if not moved or self.closed:
                if not self.placed and not self.closed and self._bulky():
                    self._place()
                return
        if self.placed or not self._place():
            self.loop.call_soon(self.pump)

    def _bulky(self) -> bool:
        up, down = self.state.halves
        return up.total + down.total >= BULK_BYTES

    def _place(self) -> bool:
        """Bulky now: move to a less loaded worker loop (main thread); whether it moved.

        The pump ran out of budget or the connection has moved ``BULK_BYTES``.  Its
        sockets leave the main loop, its pipes join the worker's pool, and the worker
        registers them again (epoll reports what is ready at once) and pumps."""
        self.placed = True
        pool = self.relay.engine
        loop = pool.place_bulk()
        if loop is None:
            return False
        main = self.loop
        main.remove(self.fds[0])
        main.remove(self.fds[1])
        pool.release(main)
        if self.timer is not None:           # the idle timer: re-armed on the new loop
            self.timer.cancel()
            self.timer = None
        pipes = pool.pipes_of(loop)
        for way in self.ways:
            way.move_to(pipes)
        self.loop = loop
        loop.call_soon_threadsafe(self._adopt)
        return True

    def _adopt(self) -> None:
        """Take over on this loop's thread, where ``_place`` moved the connection."""
        if self.closed:
            return
        try:
            self.loop.add(self.fds[0], _ET_MASK, self._on_client)
            self.loop.add(self.fds[1], _ET_MASK, self._on_target)
        except OSError:
            log.exception("%s: cannot move a connection", self.relay.name)
            self._apply(self.state.fail())
            return
        due = self.state.due()
        if due is not None:
            self.timer = self.loop.call_later(due - self.loop.now(), self._on_timeout)
        self.pump()

    def _move(self, d: int) -> int:
        """One round of half ``d``: fill its buffer from its source, drain it to its sink.

        Bytes moved (1 for a FIN or a switch to copying); every count goes to the state."""
        if self.closed:
            return 0
        state = self.state
        half = state.halves[d]
        way = self.ways[d]
        moved = 0
        if self.rd[d] and half.wants_read():
            asked = half.capacity - half.pending
            try:
                n = way.fill(self.fds[d], asked)
            except BlockingIOError:
                if not half.pending:
                    self.rd[d] = False
                    way.emptied()              # an idle connection holds no pipe
                elif way.copying:
                    self.rd[d] = False
            except OSError as exc:
                return self._failed(d, d, exc)
            else:
                if n:
                    state.received(half.direction, n)
                    moved = n
                    if way.drained(asked, n, half.pending) and not self.hup[d]:
                        self.rd[d] = False     # edge-triggered: new bytes bring a new event
                else:
                    moved = 1
                    self._apply(state.eof(half.direction))
                    if self.closed:
                        return moved
        if half.pending and self.wr[1 - d]:
            try:
                n = way.drain(self.fds[1 - d], half.pending)
            except BlockingIOError:
                self.wr[1 - d] = False
            except OSError as exc:
                return self._failed(d, 1 - d, exc)
            else:
                moved += n
                actions = state.sent(half.direction, n)
                if not half.pending:
                    way.emptied()
                if actions:
                    self._apply(actions)
        return moved

    def _failed(self, d: int, side: int, exc: OSError) -> int:
        """A read (``side == d``) or write of half ``d`` failed."""
        way = self.ways[d]
        if exc.errno == errno.EINVAL and not way.copying:
            log.debug("%s: splice refused, copying", self.relay.name)
            way.to_copy(self.state.halves[d].pending)
            self.state.resize(self.state.halves[d].direction, way.capacity)
            return 1
        self._apply(self.state.reset(Side(side), exc.errno or 0))
        return 0

    # -- actions -----------------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, ShutdownWrite):
                try:
                    self.socks[action.side].shutdown(socket.SHUT_WR)
                except OSError as exc:
                    follow = self.state.reset(action.side, exc.errno or 0)
                    if follow:
                        self._apply(follow)
                        return
                    # the state had ended already (the last half): close as it said
            elif isinstance(action, Abort):
                self._close(action.side, abort=True)
            elif isinstance(action, Close):
                self._close(action.side, abort=False)
            elif isinstance(action, Finished):
                self._finish(action)

    def _close(self, side: int, abort: bool) -> None:
        sock = self.socks[side]
        if sock.fileno() < 0:
            return
        self.loop.remove(self.fds[side])
        if abort:
            reset(sock)
        else:
            sock.close()

    def _finish(self, finished: Finished) -> None:
        self.closed = True
        pool = self.relay.engine
        pool.release(self.loop)
        if self.placed and self.loop is pool.loop:
            pool.bulk_ended()                # a bulky connection that stayed on main
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for half, way in zip(self.state.halves, self.ways, strict=True):
            way.release(half.pending)
        self.relay.forget(self)
        self.relay.finished(self, finished.outcome, finished.errno)
