"""TCP for the DNS proxy: client connections and connections to an upstream, non-blocking.

Theory of operation: the engine watches readers only (level-triggered EPOLLIN), but TCP
must also wait for a socket to become writable (a connect under way, an answer that did
not fit the socket buffer).  So these sockets live in a private epoll (:class:`Poller`),
level-triggered, whose own fd the engine watches as a reader: an epoll fd is readable
while one of its sockets is ready.  Everything still runs on the engine thread.

A client connection (:class:`TcpClient`) carries queries and answers with a two-byte
length prefix (RFC 1035 4.2.2, RFC 7766).  Queries may be pipelined; at most
``MAX_INFLIGHT`` of one connection are resolved at once (reading pauses beyond that), so
its buffers stay bounded: one partial query in, the answers not yet written out.  Answers
go back in the order they come.  A connection with nothing in flight and nothing to write
for ``idle_timeout`` seconds is closed; so is one whose message has no readable header.

An upstream connection (:class:`TcpUpstream`) sends one query and reads one answer, for
a truncated UDP answer to a TCP client; its timeout is the pending table's.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from portproxy.engine import Engine, TimerHandle

__all__ = ["MAX_INFLIGHT", "Poller", "TcpClient", "TcpUpstream"]

log = logging.getLogger("hns.daemon.dns")

MAX_MESSAGE = 65535
MAX_INFLIGHT = 16
READ_SIZE = 16384
POLL_BATCH = 256
_DEAD = select.EPOLLERR | select.EPOLLHUP


class Poller:
    """A private epoll for sockets that wait for reading or writing (see the module)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._fresh: set[int] = set()

    def register(self, sock: socket.socket, mask: int, handler: Callable[[int], None]) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
            self.engine.add_reader(self._epoll.fileno(), self._dispatch)
        fd = sock.fileno()
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler
        self._fresh.add(fd)

    def modify(self, sock: socket.socket, mask: int) -> None:
        if self._epoll is not None:
            self._epoll.modify(sock.fileno(), mask)

    def unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._handlers.pop(fd, None) is not None and self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def close(self) -> None:
        if self._epoll is not None:
            self.engine.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        self._handlers.clear()

    def _dispatch(self) -> None:
        if self._epoll is None:
            return
        events = self._epoll.poll(0, POLL_BATCH)
        fresh = self._fresh
        fresh.clear()
        for fd, mask in events:
            if fd in fresh:
                continue        # the fd was closed and reused during this batch
            handler = self._handlers.get(fd)
            if handler is not None:
                try:
                    handler(mask)
                except Exception:
                    log.exception("dns: handler of fd %d failed", fd)


class ClientHost(Protocol):
    """What a :class:`TcpClient` needs from the server."""

    poller: Poller
    idle_timeout: float

    def tcp_query(self, client: TcpClient, message: bytes) -> None: ...

    def forget(self, client: TcpClient) -> None: ...


class TcpClient:
    """One accepted connection: length-prefixed queries in, answers out."""

    def __init__(self, host: ClientHost, listener: object, sock: socket.socket) -> None:
        self.host = host
        self.listener = listener
        self.sock = sock
        self.engine = host.poller.engine
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.inflight = 0
        self.eof = False
        self.closed = False
        self._parsing = False
        self.last_active = self.engine.now()
        self._mask = select.EPOLLIN
        host.poller.register(sock, self._mask, self._on_event)
        self._timer: TimerHandle | None = self.engine.call_later(host.idle_timeout,
                                                                 self._check_idle)

    def send(self, answer: bytes) -> None:
        """The answer to one of this connection's queries (or a refusal of it)."""
        if self.closed:
            return
        self.inflight -= 1
        self.outbuf += len(answer).to_bytes(2, "big") + answer
        self.last_active = self.engine.now()
        self._flush()
        if not self.closed and not self._parsing:
            self._parse()
        self._update()

    def reject(self) -> None:
        """A message without a readable header: the stream cannot be trusted; close."""
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.host.poller.unregister(self.sock)
        self.sock.close()
        self.host.forget(self)

    def _on_event(self, mask: int) -> None:
        if mask & _DEAD:
            self.close()
            return
        if mask & select.EPOLLOUT:
            self._flush()
        if not self.closed and mask & select.EPOLLIN:
            self._read()
        self._update()

    def _read(self) -> None:
        try:
            chunk = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not chunk:
            self.eof = True
            return
        self.last_active = self.engine.now()
        self.inbuf += chunk
        self._parse()

    def _parse(self) -> None:
        # an answer given at once calls send(), which must not parse again (recursion)
        self._parsing = True
        try:
            while self.inflight < MAX_INFLIGHT and len(self.inbuf) >= 2 and not self.closed:
                size = int.from_bytes(self.inbuf[:2], "big")
                if len(self.inbuf) < 2 + size:
                    return
                message = bytes(self.inbuf[2:2 + size])
                del self.inbuf[:2 + size]
                self.inflight += 1
                self.host.tcp_query(self, message)
        finally:
            self._parsing = False

    def _flush(self) -> None:
        while self.outbuf and not self.closed:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            del self.outbuf[:sent]

    def _update(self) -> None:
        if self.closed:
            return
        if self.eof and not self.inflight and not self.outbuf:
            self.close()
            return
        mask = 0
        if not self.eof and self.inflight < MAX_INFLIGHT:
            mask |= select.EPOLLIN
        if self.outbuf:
            mask |= select.EPOLLOUT
        if mask != self._mask:
            self._mask = mask
            self.host.poller.modify(self.sock, mask)

    def _check_idle(self) -> None:
        self._timer = None
        if self.closed:
            return
        idle = self.engine.now() - self.last_active
        if not self.inflight and not self.outbuf and idle >= self.host.idle_timeout:
            log.debug("dns: closing an idle TCP client")
            self.close()
            return
        delay = max(self.host.idle_timeout - idle, 0.1)
        self._timer = self.engine.call_later(delay, self._check_idle)


class TcpUpstream:
    """One query to an upstream over TCP, one answer back; ``done(data | None)`` at the
    end (None: it failed)."""

    def __init__(self, poller: Poller, sockaddr: tuple[object, ...], family: int,
                 query: bytes, done: Callable[[bytes | None], None]) -> None:
        self.poller = poller
        self.done = done
        self.closed = False
        self.out = bytearray(len(query).to_bytes(2, "big") + query)
        self.inbuf = bytearray()
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setblocking(False)
            err = self.sock.connect_ex(sockaddr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"connect: {errno.errorcode.get(err, err)}")
            poller.register(self.sock, select.EPOLLOUT, self._on_event)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.poller.unregister(self.sock)
            self.sock.close()

    def _finish(self, answer: bytes | None) -> None:
        self.close()
        self.done(answer)

    def _on_event(self, mask: int) -> None:
        if self.out:
            self._write()
        elif mask & (select.EPOLLIN | _DEAD):
            self._read()

    def _write(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            log.debug("dns: TCP upstream: %s", errno.errorcode.get(err, err))
            self._finish(None)
            return
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish(None)
            return
        del self.out[:sent]
        if not self.out:
            self.poller.modify(self.sock, select.EPOLLIN)

    def _read(self) -> None:
        want = 2 if len(self.inbuf) < 2 else 2 + int.from_bytes(self.inbuf[:2], "big")
        try:
            chunk = self.sock.recv(max(want - len(self.inbuf), 1))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._finish(None)
            return
        self.inbuf += chunk
        if len(self.inbuf) >= 2:
            size = int.from_bytes(self.inbuf[:2], "big")
            if len(self.inbuf) >= 2 + size:
                self._finish(bytes(self.inbuf[2:2 + size]))
