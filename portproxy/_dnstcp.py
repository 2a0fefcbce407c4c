"""TCP for the DNS proxy: client connections and connections to an upstream, non-blocking.

Theory of operation: these sockets wait for reading (a query, an answer) and for writing
(a connect under way, an answer that did not fit the socket buffer), on the engine's loop
with ``add_reader`` and ``add_writer`` (level-triggered); everything runs on the engine
thread.  A hang-up or an error calls the reader and the writer, whose next system call
says what happened.

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

import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from portproxy.loop import EventLoop, TimerHandle

__all__ = ["MAX_INFLIGHT", "TcpClient", "TcpUpstream"]

log = logging.getLogger("hns.daemon.dns")

MAX_MESSAGE = 65535
MAX_INFLIGHT = 16
READ_SIZE = 16384


class ClientHost(Protocol):
    """What a :class:`TcpClient` needs from the server."""

    @property
    def engine(self) -> EventLoop: ...

    @property
    def idle_timeout(self) -> float: ...

    def tcp_query(self, client: TcpClient, message: bytes) -> None: ...

    def forget(self, client: TcpClient) -> None: ...


class TcpClient:
    """One accepted connection: length-prefixed queries in, answers out."""

    def __init__(self, host: ClientHost, listener: object, sock: socket.socket) -> None:
        self.host = host
        self.listener = listener
        self.sock = sock
        self.engine = host.engine
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.inflight = 0
        self.eof = False
        self.closed = False
        self._parsing = False
        self.last_active = self.engine.now()
        self._reading = True
        self._writing = False
        self.engine.add_reader(sock, self._on_readable)
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
        self._watch(reading=False, writing=False)
        self.sock.close()
        self.host.forget(self)

    def _on_readable(self) -> None:
        self._read()
        self._update()

    def _on_writable(self) -> None:
        self._flush()
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
        self._watch(reading=not self.eof and self.inflight < MAX_INFLIGHT,
                    writing=bool(self.outbuf))

    def _watch(self, *, reading: bool, writing: bool) -> None:
        if reading != self._reading:
            self._reading = reading
            if reading:
                self.engine.add_reader(self.sock, self._on_readable)
            else:
                self.engine.remove_reader(self.sock)
        if writing != self._writing:
            self._writing = writing
            if writing:
                self.engine.add_writer(self.sock, self._on_writable)
            else:
                self.engine.remove_writer(self.sock)

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

    def __init__(self, engine: EventLoop, sockaddr: tuple[object, ...], family: int,
                 query: bytes, done: Callable[[bytes | None], None]) -> None:
        self.engine = engine
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
            engine.add_writer(self.sock, self._write)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.out:
                self.engine.remove_writer(self.sock)
            else:
                self.engine.remove_reader(self.sock)
            self.sock.close()

    def _finish(self, answer: bytes | None) -> None:
        self.close()
        self.done(answer)

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
            self.engine.remove_writer(self.sock)
            self.engine.add_reader(self.sock, self._read)

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
