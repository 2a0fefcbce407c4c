"""The I/O half of the TCP relay: accept, dial, and move bytes as ``portproxy.tcp`` says.

Theory of operation: a :class:`TcpRelay` accepts in batches on its (level-triggered)
listening socket; for each client it dials the target and makes a :class:`Connection`
on the main loop, which moves it to a worker loop once it proves bulky (see
``portproxy.engine``).  The connection registers both sockets edge-triggered and keeps
what epoll reported (readable, writable) per socket until a system call says EAGAIN.
:meth:`Connection.pump` moves both directions in rounds -- fill a half's buffer from its
source while the state wants it, drain it to its sink -- until a round moves nothing,
or until a budget of rounds is spent, when it defers itself so other connections get
their turn.

A short read empties the socket, so the readable mark is dropped without the read that
would only say EAGAIN (new bytes bring a new edge) -- except once the peer's FIN or an
error was reported: a FIN that came with the last bytes brings no new edge, so from then
on the source is read until it says EOF.  A splice is short also when the pipe is full
(pipe capacity counts page slots, not bytes), so its shortcut holds only while the pipe
holds fewer bytes than it has slots; and a splice that fails with EAGAIN while the pipe
holds bytes is ambiguous too, so the readable mark is kept: the next drain of the pipe
leads to another try, which settles it.  EINVAL from splice switches that half to
copying.  Every other error of a read or write is a reset of that side.  The actions of
the pure state are carried out by :meth:`Connection._apply`.

Limits of a relay: over ``max_connections`` live connections a new client is accepted
and reset at once (logged once until the relay is below its cap again).  With an
``idle_timeout`` each connection has one timer, re-armed only when it fires early (the
pump notes the time it last moved bytes, once per wake-up).  A client whose address is
the local address of a connection the engine dialed is that connection coming back: if
it already went through this relay it is a loop and is reset (see ``portproxy.engine``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from portproxy._buffers import Way
from portproxy._relay import Address, Relay, family_of
from portproxy.tcp import (
    Abort,
    Action,
    Close,
    ConnState,
    Finished,
    HalfState,
    Outcome,
    ShutdownWrite,
    Side,
    TcpConnection,
)

if TYPE_CHECKING:
    from portproxy.engine import Engine, TimerHandle

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "Connection", "Dial", "TcpRelay", "dial_tcp"]

log = logging.getLogger("portproxy.engine")

DEFAULT_CONNECT_TIMEOUT = 10.0
ACCEPT_BATCH = 64          # connections accepted per wake-up of a listening socket
PUMP_ROUNDS = 16           # rounds a connection moves per wake-up before it yields
BULK_BYTES = 4 << 20       # bytes after which a connection may move to a worker loop
ACCEPT_PAUSE = 1.0         # seconds a listener rests after running out of fds
LOOP_LOG_INTERVAL = 60.0   # seconds between two warnings of loops cut by one relay
_ET_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_IN_MASK = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OUT_MASK = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_ERR_MASK = select.EPOLLERR
_HUP_MASK = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_CONNECT_MASK = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_LINGER_RESET = struct.pack("ii", 1, 0)
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_OPEN, _CONNECTING = HalfState.OPEN, ConnState.CONNECTING
_NO_PATH: frozenset[TcpRelay] = frozenset()

Dial = Callable[[Address], socket.socket]


def dial_tcp(address: Address,
             factory: Callable[[int, int], socket.socket] = socket.socket) -> socket.socket:
    """A non-blocking TCP socket connecting to ``address`` (the connect under way).

    ``factory(family, type)`` makes the socket: pass one that creates it in another
    network namespace to dial there (e.g. ``Peer.socket`` of the test sandbox).
    """
    sock = factory(family_of(address[0]), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, f"connect to {address[0]}:{address[1]}: {errno.errorcode.get(err)}")
    except BaseException:
        sock.close()
        raise
    return sock


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` so that the peer gets a RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def endpoint(address: object) -> Address | None:
    """``(host, port)`` of a socket address; an IPv4-mapped IPv6 host as IPv4; None for
    what is not an IP socket address."""
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


def _dialed(target: Address, client: socket.socket) -> bool:
    """Whether ``client`` was accepted at ``target``: with the peer's address this makes
    the whole 4-tuple of a connection dialed to ``target`` (connect() may give the same
    local port to connections towards different destinations)."""
    try:
        local = endpoint(client.getsockname())
        return local is not None and local[1] == target[1] and (
            ipaddress.ip_address(local[0].split("%", 1)[0])
            == ipaddress.ip_address(target[0].split("%", 1)[0]))
    except (OSError, ValueError):
        return False


def _nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpRelay(Relay):
    """A listening socket whose connections are relayed to ``connect``."""

    protocol = "tcp"

    def __init__(self, engine: Engine, listener: socket.socket, connect: Address, *,
                 name: str, dial: Dial, connect_timeout: float, idle_timeout: float = 0.0,
                 max_connections: int = 0, track: bool = False) -> None:
        super().__init__(name, listener.getsockname()[:2], connect)
        self.engine = engine
        self.listener = listener
        self.dial = dial
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.track = track                    # dials in the engine's namespace: loops?
        self.conns: set[Connection] = set()   # on every loop; guarded by _lock
        self._lock = threading.Lock()
        self._closing = False
        self._paused: TimerHandle | None = None
        self._full = False                    # at the cap (logged once per time)
        self._loop_logged = float("-inf")

    def live(self) -> int:
        return len(self.conns)

    def start(self) -> None:
        self.listener.setblocking(False)
        if not self.listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self.listener.listen(socket.SOMAXCONN)
        self.engine._register(self.listener.fileno(), select.EPOLLIN, self._on_accept)

    def close(self) -> None:
        self._closing = True
        if self._paused is not None:
            self._paused.cancel()
        with contextlib.suppress(OSError):
            self.engine._unregister(self.listener.fileno())
        self.listener.close()
        with self._lock:
            conns = list(self.conns)
        for conn in conns:
            loop = conn.engine
            if loop._on_loop_thread():
                conn.kill()
            else:
                loop.call_soon_threadsafe(conn.kill)

    def _on_accept(self, _mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                client, peer = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._pause(exc)
                    return
                continue             # ECONNABORTED and the like: that client is gone
            if self.max_connections and len(self.conns) >= self.max_connections:
                self._refuse(client)
                continue
            if self._full:
                self._full = False
                log.info("%s: below %d connections: accepting again", self.name,
                         self.max_connections)
            path = self._path_of(client, peer)
            if path is None:
                self._cut(client, peer)
                continue
            self.accepted += 1
            self._open(client, path)

    def _refuse(self, client: socket.socket) -> None:
        """At the cap: reset the new client now; say so once until below the cap."""
        _reset(client)
        with self._lock:
            self.refused += 1
        if not self._full:
            self._full = True
            log.warning("%s: %d connections (its maximum): refusing new ones", self.name,
                        self.max_connections)

    def _path_of(self, client: socket.socket, peer: object) -> frozenset[TcpRelay] | None:
        """The relays a client went through if it is one of the engine's own connections;
        None if this relay is one of them (a loop)."""
        dials = self.engine._dials
        if not dials:
            return _NO_PATH
        key = endpoint(peer)
        origin = dials.get(key) if key is not None else None
        if origin is None or not _dialed(origin.relay.connect, client):
            return _NO_PATH
        path = origin.path | {origin.relay}
        return None if self in path else path

    def _cut(self, client: socket.socket, peer: object) -> None:
        """A loop: reset the client (the chain of connections behind it then resets)."""
        _reset(client)
        with self._lock:
            self.loops += 1
            loops = self.loops
        now = self.engine.now()
        if now - self._loop_logged >= LOOP_LOG_INTERVAL:
            self._loop_logged = now
            log.warning("%s: a connection it relayed came back to it from %s (a loop): "
                        "cut (%d so far)", self.name, peer, loops)
    def _pause(self, exc: OSError) -> None:
        """Out of fds or memory: stop accepting for a while instead of spinning."""
        log.warning("%s: accept: %s; pausing %.0f s", self.name, exc.strerror, ACCEPT_PAUSE)
        with self._lock:
            self.errors += 1
        self.engine._unregister(self.listener.fileno())
        self._paused = self.engine.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if not self._closing:
            self.engine._register(self.listener.fileno(), select.EPOLLIN, self._on_accept)

    def _open(self, client: socket.socket, path: frozenset[TcpRelay] = _NO_PATH) -> None:
        try:
            client.setblocking(False)
            _nodelay(client)
            target = self.dial(self.connect)
        except OSError as exc:
            log.debug("%s: dial %s: %s", self.name, self.connect, exc)
            with self._lock:
                self.errors += 1
            _reset(client)
            return
        try:
            conn = Connection(self, client, target)
        except OSError as exc:
            log.warning("%s: cannot watch a connection: %s", self.name, exc)
            with self._lock:
                self.errors += 1
            _reset(client)
            target.close()
            return
        conn.path = path
        with self._lock:
            self.conns.add(conn)
        if self.track:
            self._watch(conn, target)

    def _watch(self, conn: Connection, target: socket.socket) -> None:
        """Remember the local address of a connection dialed here (loop detection)."""
        try:
            key = endpoint(target.getsockname())
        except OSError:
            return
        if key is not None:
            conn.dial_key = key
            with self.engine._dials_lock:
                self.engine._dials[key] = conn

    def forget(self, conn: Connection) -> None:
        """``conn`` ended: its local address is no longer ours (any loop's thread)."""
        key = conn.dial_key
        if key is not None:
            dials = self.engine._dials
            with self.engine._dials_lock:
                if dials.get(key) is conn:
                    del dials[key]

    def finished(self, conn: Connection, outcome: Outcome, err: int) -> None:
        with self._lock:
            self.conns.discard(conn)
            if self._closing:
                return
            if outcome.is_error:
                self.errors += 1
            elif outcome is Outcome.RESET:
                self.resets += 1
            elif outcome is Outcome.IDLE:
                self.idle_closed += 1
        if outcome.is_error:
            log.debug("%s: %s (%s)", self.name, outcome.value, errno.errorcode.get(err, err))


class Connection:
    """The sockets, buffers and readiness of one relayed connection."""

    __slots__ = ("closed", "dial_key", "engine", "fds", "hup", "path", "placed", "rd", "relay",
                 "socks", "state", "timer", "ways", "wr")

    def __init__(self, relay: TcpRelay, client: socket.socket, target: socket.socket) -> None:
        engine = relay.engine              # the loop whose thread runs it (moves if bulky)
        self.relay = relay
        self.engine = engine
        self.socks = (client, target)
        self.fds = (client.fileno(), target.fileno())
        self.rd = [False, False]          # readiness seen and not yet used up, per Side
        self.wr = [False, False]
        self.hup = [False, False]         # the peer's FIN (or an error) was reported
        self.ways = (Way(engine.pipes, engine.buffer_size, engine.splice),
                     Way(engine.pipes, engine.buffer_size, engine.splice))
        self.state = TcpConnection(engine.now(), relay.connect_timeout,
                                   self.ways[0].capacity, relay.idle_timeout)
        self.dial_key: Address | None = None   # its local address, while watched for loops
        self.path = _NO_PATH                  # the relays it came through (ours only)
        self.closed = False
        self.placed = False               # whether it was found bulky and placed
        self.timer: TimerHandle | None = None
        engine._register(self.fds[0], _ET_MASK, self._on_client)
        try:
            engine._register(self.fds[1], _ET_MASK, self._on_target)
        except OSError:
            engine._unregister(self.fds[0])
            raise
        self.timer = engine.call_later(relay.connect_timeout, self._on_timeout)
        engine._assigned += 1

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
        _nodelay(target)
        self._apply(self.state.connected(self.engine.now()))
        if self.relay.idle_timeout:
            self.timer = self.engine.call_later(self.relay.idle_timeout, self._on_timeout)
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
        now = self.engine.now()
        actions = self.state.tick(now)
        if actions:
            self._apply(actions)
            return
        due = self.state.due()
        if due is not None:                  # early, or bytes moved since it was armed
            self.timer = self.engine.call_later(due - now, self._on_timeout)

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
                self.state.active(self.engine.now())
                idle = 0.0                      # once per wake-up is precise enough
            if not moved or self.closed:
                if not self.placed and not self.closed and self._bulky():
                    self._place()
                return
        if self.placed or not self._place():
            self.engine._defer(self.pump)

    def _bulky(self) -> bool:
        up, down = self.state.halves
        return up.total + down.total >= BULK_BYTES

    def _place(self) -> bool:
        """Bulky now: move to a less loaded worker loop (main thread); whether it moved.

        The pump ran out of budget or the connection has moved ``BULK_BYTES``.  Its
        sockets leave the main epoll, its pipes join the worker's pool, and the worker
        registers them again (epoll reports what is ready at once) and pumps."""
        self.placed = True
        main = self.engine
        loop = main._place_bulk()
        if loop is None:
            return False
        main._unregister(self.fds[0])
        main._unregister(self.fds[1])
        main._release()
        if self.timer is not None:           # the idle timer: re-armed on the new loop
            self.timer.cancel()
            self.timer = None
        for way in self.ways:
            way.move_to(loop.pipes)
        self.engine = loop
        loop.call_soon_threadsafe(self._adopt)
        return True

    def _adopt(self) -> None:
        """Take over on this loop's thread, where ``_place`` moved the connection."""
        if self.closed:
            return
        try:
            self.engine._register(self.fds[0], _ET_MASK, self._on_client)
            self.engine._register(self.fds[1], _ET_MASK, self._on_target)
        except OSError:
            log.exception("%s: cannot move a connection", self.relay.name)
            self._apply(self.state.fail())
            return
        due = self.state.due()
        if due is not None:
            self.timer = self.engine.call_later(due - self.engine.now(), self._on_timeout)
        self.pump()

    def _move(self, d: int) -> int:
        """One round of half ``d``: fill its buffer from its source, drain it to its sink."""
        if self.closed:
            return 0
        half = self.state.halves[d]
        way = self.ways[d]
        moved = 0
        if half.state is _OPEN and half.pending < half.capacity and self.rd[d]:
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
                    half.pending += n          # TcpConnection.received, inlined
                    moved = n
                    if way.drained(asked, n, half.pending) and not self.hup[d]:
                        self.rd[d] = False     # edge-triggered: new bytes bring a new event
                else:
                    moved = 1
                    self._apply(self.state.eof(half.direction))
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
                actions = self.state.sent(half.direction, n)
                if not half.pending:
                    way.emptied()
                if actions:
                    self._apply(actions)
        return moved

    def _failed(self, d: int, side: int, exc: OSError) -> int:
        """A read (``side == d``) or write of half ``d`` failed."""
        way = self.ways[d]
        if exc.errno == errno.EINVAL and not way.copying:
            half = self.state.halves[d]
            log.debug("%s: splice refused, copying", self.relay.name)
            way.to_copy(half.pending)
            half.capacity = way.capacity
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
                    self._apply(self.state.reset(action.side, exc.errno or 0))
                    return
            elif isinstance(action, Abort):
                self._close(action.side, reset=True)
            elif isinstance(action, Close):
                self._close(action.side, reset=False)
            elif isinstance(action, Finished):
                self._finish(action)

    def _close(self, side: int, reset: bool) -> None:
        sock = self.socks[side]
        if sock.fileno() < 0:
            return
        self.engine._unregister(self.fds[side])
        if reset:
            _reset(sock)
        else:
            sock.close()

    def _finish(self, finished: Finished) -> None:
        self.closed = True
        self.engine._release()
        if self.placed and self.engine is self.relay.engine:
            self.engine._bulk -= 1         # a bulky connection that stayed on main
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for half, way in zip(self.state.halves, self.ways, strict=True):
            way.release(half.pending)
        self.relay.forget(self)
        self.relay.finished(self, finished.outcome, finished.errno)
