"""The I/O half of the TCP relay: accept, dial, and hand each client to a connection.

Theory of operation: a :class:`TcpRelay` accepts in batches on its (level-triggered)
listening socket, on the engine's main loop; for each client it dials the target and
makes a :class:`~portproxy._tcpconn.Connection` (which moves bytes as ``portproxy.tcp``
says, and moves itself to a worker loop once it proves bulky; see ``portproxy.engine``).

Limits of a relay: over ``max_connections`` live connections a new client is accepted
and reset at once (logged once until the relay is below its cap again).  With an
``idle_timeout`` each connection has one timer.  A client whose address is the local
address of a connection the engine dialed (its :class:`DialTable`) is that connection
coming back: if it already went through this relay it is a loop and is reset (see
``portproxy.engine``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Protocol

from portproxy._relay import Address, Relay, family_of
from portproxy._tcpconn import BULK_BYTES, PUMP_ROUNDS, Connection, Pool, nodelay, reset
from portproxy.loop import TimerHandle
from portproxy.tcp import Outcome

__all__ = ["BULK_BYTES", "DEFAULT_CONNECT_TIMEOUT", "PUMP_ROUNDS", "Connection", "Dial",
           "DialTable", "TcpRelay", "dial_tcp"]

log = logging.getLogger("portproxy.engine")

DEFAULT_CONNECT_TIMEOUT = 10.0
ACCEPT_BATCH = 64          # connections accepted per wake-up of a listening socket
ACCEPT_PAUSE = 1.0         # seconds a listener rests after running out of fds
LOOP_LOG_INTERVAL = 60.0   # seconds between two warnings of loops cut by one relay
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_NO_PATH: frozenset[object] = frozenset()

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


class DialTable:
    """The local address of each live connection the engine dialed -> that connection.

    Read on the main loop (accepts), written on any loop's thread (dials, ends)."""

    def __init__(self) -> None:
        self._conns: dict[Address, Connection] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._conns)

    def get(self, key: Address) -> Connection | None:
        return self._conns.get(key)

    def add(self, key: Address, conn: Connection) -> None:
        with self._lock:
            self._conns[key] = conn

    def discard(self, key: Address, conn: Connection) -> None:
        """Forget ``key`` if it is still ``conn``'s."""
        with self._lock:
            if self._conns.get(key) is conn:
                del self._conns[key]


class TcpPool(Pool, Protocol):
    """What a TCP relay needs of the engine, beyond what its connections need."""

    @property
    def dials(self) -> DialTable: ...

    def now(self) -> float: ...


class TcpRelay(Relay):
    """A listening socket whose connections are relayed to ``connect``."""

    protocol = "tcp"

    def __init__(self, engine: TcpPool, listener: socket.socket, connect: Address, *,
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

    def moved(self) -> tuple[int, int]:
        # the halves count what they wrote; an ended connection's counts were added at
        # its end, so counting costs nothing per byte
        with self._lock:
            up, down = self.bytes_up, self.bytes_down
            conns = list(self.conns)
        for conn in conns:
            up += conn.state.up.total
            down += conn.state.down.total
        return up, down

    def start(self) -> None:
        self.listener.setblocking(False)
        if not self.listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self.listener.listen(socket.SOMAXCONN)
        self.engine.loop.add(self.listener.fileno(), select.EPOLLIN, self._on_accept)

    def close(self) -> None:
        self._closing = True
        if self._paused is not None:
            self._paused.cancel()
        with contextlib.suppress(OSError):
            self.engine.loop.remove(self.listener.fileno())
        self.listener.close()
        with self._lock:
            conns = list(self.conns)
        for conn in conns:
            loop = conn.loop
            if loop.on_loop_thread():
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
        reset(client)
        with self._lock:
            self.refused += 1
        if not self._full:
            self._full = True
            log.warning("%s: %d connections (its maximum): refusing new ones", self.name,
                        self.max_connections)

    def _path_of(self, client: socket.socket, peer: object) -> frozenset[object] | None:
        """The relays a client went through if it is one of the engine's own connections;
        None if this relay is one of them (a loop)."""
        dials = self.engine.dials
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
        reset(client)
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
        self.engine.loop.remove(self.listener.fileno())
        self._paused = self.engine.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if not self._closing:
            self.engine.loop.add(self.listener.fileno(), select.EPOLLIN, self._on_accept)

    def _open(self, client: socket.socket, path: frozenset[object] = _NO_PATH) -> None:
        try:
            client.setblocking(False)
            nodelay(client)
            target = self.dial(self.connect)
        except OSError as exc:
            log.debug("%s: dial %s: %s", self.name, self.connect, exc)
            with self._lock:
                self.errors += 1
            reset(client)
            return
        try:
            conn = Connection(self, client, target)
        except OSError as exc:
            log.warning("%s: cannot watch a connection: %s", self.name, exc)
            with self._lock:
                self.errors += 1
            reset(client)
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
            self.engine.dials.add(key, conn)

    def forget(self, conn: Connection) -> None:
        """``conn`` ended: its local address is no longer ours (any loop's thread)."""
        key = conn.dial_key
        if key is not None:
            self.engine.dials.discard(key, conn)

    def finished(self, conn: Connection, outcome: Outcome, err: int) -> None:
        with self._lock:
            self.conns.discard(conn)
            self.bytes_up += conn.state.up.total
            self.bytes_down += conn.state.down.total
            if self._closing:
                return
            if outcome.is_error:
                self.errors += 1
                if outcome is Outcome.TIMEOUT:
                    self.timeouts += 1
                elif outcome is Outcome.REFUSED:
                    self.unreachable += 1
            elif outcome is Outcome.RESET:
                self.resets += 1
            elif outcome is Outcome.IDLE:
                self.idle_closed += 1
        if outcome.is_error:
            log.debug("%s: %s (%s)", self.name, outcome.value, errno.errorcode.get(err, err))
