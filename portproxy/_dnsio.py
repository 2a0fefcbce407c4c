"""The I/O half of the DNS proxy: listeners, upstream sockets, the pending table's timer.

Theory of operation: each listener is a UDP socket and a TCP listening socket on one
address (a NAT gateway, port 53), watched by the engine.  A query is parsed
(:mod:`portproxy.dnsmsg`), handed to the pending table (:mod:`portproxy.dnsstate`), and
the actions the table returns are carried out here: datagrams to an upstream go out on
one unconnected socket per address family, TCP tries and TCP clients live in
:mod:`portproxy._dnstcp`.  One engine timer follows the table's earliest deadline.

The upstream sockets set IP_RECVERR / IPV6_RECVERR: an ICMP error (port unreachable: no
server there) comes back on the socket's error queue with the query it answers, whose id
names the try, which then moves on to the next upstream at once instead of waiting for
its timeout.

Nothing a client or an upstream sends can stop the loop: every handler catches what it
does not expect, logs it and counts it (``errors``).
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from portproxy import dnsmsg
from portproxy._dnstcp import Poller, TcpClient, TcpUpstream
from portproxy.dnsmsg import MessageError
from portproxy.dnsstate import (
    DEFAULT_MAX_PENDING,
    DEFAULT_TIMEOUT,
    MAX_UPSTREAMS,
    Action,
    CancelTcp,
    Forwarding,
    Reply,
    SendTcp,
    SendUdp,
    Upstream,
    source_key,
)
from portproxy.proxies import open_listener

if TYPE_CHECKING:
    from portproxy.engine import Engine, TimerHandle

__all__ = ["DEFAULT_IDLE_TIMEOUT", "DnsServer", "Listener"]

log = logging.getLogger("hns.daemon.dns")

BATCH = 64
MAX_DATAGRAM = 65535
DEFAULT_IDLE_TIMEOUT = 10.0
DEFAULT_MAX_TCP_CLIENTS = 256
IP_RECVERR = 11             # linux/in.h; Python 3.11's socket module lacks it
IPV6_RECVERR = 25           # linux/in6.h
UNREACHABLE = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                         errno.EHOSTDOWN, errno.ENETDOWN})


@dataclass(eq=False)
class Listener:
    """UDP and TCP on ``host``:``port`` for one network, with its counters."""

    name: str
    host: str
    port: int
    udp: socket.socket
    tcp: socket.socket
    queries: int = 0
    failures: int = 0       # answered SERVFAIL by the proxy (no upstream answered)
    malformed: int = 0      # refused (FORMERR, NOTIMP) or dropped
    closed: bool = False
    clients: set[TcpClient] = field(default_factory=set)


class UdpClient(NamedTuple):
    listener: Listener
    address: tuple[str, int]


class DnsServer:
    """Answers DNS on its listeners by forwarding to ``upstreams()`` (called per query;
    it should be cheap and return the same tuple while nothing changed)."""

    def __init__(self, engine: Engine, upstreams: Callable[[], tuple[Upstream, ...]], *,
                 timeout: float = DEFAULT_TIMEOUT, max_pending: int = DEFAULT_MAX_PENDING,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_tcp_clients: int = DEFAULT_MAX_TCP_CLIENTS) -> None:
        self.engine = engine
        self.forwarding = Forwarding(timeout=timeout, max_pending=max_pending)
        self.idle_timeout = idle_timeout
        self.max_tcp_clients = max_tcp_clients
        self.poller = Poller(engine)
        self.errors = 0
        self._upstreams = upstreams
        self._configured: tuple[Upstream, ...] | None = None
        self._listeners: list[Listener] = []
        self._sockets: dict[int, socket.socket] = {}
        self._sockaddrs: dict[Upstream, tuple[object, ...]] = {}
        self._tcp: dict[int, TcpUpstream] = {}
        self._tcp_clients = 0
        self._timer: TimerHandle | None = None
        self._buf = bytearray(MAX_DATAGRAM)

    # -- listeners ---------------------------------------------------------------------

    def listen(self, name: str, host: str, port: int = 53) -> Listener:
        """Serve ``host``:``port`` (UDP and TCP); OSError if either cannot be bound."""
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind((host, port))     # no SO_REUSEADDR: a second server must not hide
            udp.setblocking(False)
            tcp = open_listener(socket.AF_INET, socket.SOCK_STREAM, host, udp.getsockname()[1])
        except BaseException:
            udp.close()
            raise
        listener = Listener(name, host, udp.getsockname()[1], udp, tcp)
        self.engine.add_reader(udp, lambda: self._guard(self._on_udp, listener))
        self.engine.add_reader(tcp, lambda: self._guard(self._on_accept, listener))
        self._listeners.append(listener)
        self._configured = None
        return listener

    def unlisten(self, listener: Listener) -> None:
        if listener.closed:
            return
        listener.closed = True
        for sock in (listener.udp, listener.tcp):
            self.engine.remove_reader(sock)
            sock.close()
        for client in list(listener.clients):
            client.close()
        self._listeners.remove(listener)
        self._configured = None

    def upstreams(self) -> tuple[Upstream, ...]:
        """The upstreams in use: the configured ones minus the listeners themselves."""
        configured = self._upstreams()
        if configured is not self._configured:
            own = {(listener.host, listener.port) for listener in self._listeners}
            self._configured = configured
            self.forwarding.upstreams = tuple(
                u for u in configured if u.key not in own)[:MAX_UPSTREAMS]
        return self.forwarding.upstreams

    def close(self) -> None:
        for listener in list(self._listeners):
            self.unlisten(listener)
        for attempt in list(self._tcp.values()):
            attempt.close()
        self._tcp.clear()
        for sock in self._sockets.values():
            self.engine.remove_reader(sock)
            sock.close()
        self._sockets.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.poller.close()

    def _guard(self, handler: Callable[[Listener], None], listener: Listener) -> None:
        try:
            handler(listener)
        except Exception:
            self.errors += 1
            log.exception("dns: %s failed", listener.name)

    # -- clients -----------------------------------------------------------------------

    def _on_udp(self, listener: Listener) -> None:
        for _ in range(BATCH):
            if listener.closed:
                return
            try:
                n, address = listener.udp.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("dns: %s: receive: %s", listener.name, exc)
                continue
            self._query(listener, UdpClient(listener, address), bytes(self._buf[:n]))

    def _on_accept(self, listener: Listener) -> None:
        for _ in range(BATCH):
            try:
                sock, _address = listener.tcp.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # out of fds, say: try again on the next wake-up
                log.warning("dns: %s: accept: %s", listener.name, exc)
                return
            if self._tcp_clients >= self.max_tcp_clients:
                sock.close()
                self.errors += 1
                continue
            sock.setblocking(False)
            self._tcp_clients += 1
            listener.clients.add(TcpClient(self, listener, sock))

    def tcp_query(self, client: TcpClient, message: bytes) -> None:
        assert isinstance(client.listener, Listener)
        self._query(client.listener, client, message)

    def forget(self, client: TcpClient) -> None:
        assert isinstance(client.listener, Listener)
        client.listener.clients.discard(client)
        self._tcp_clients -= 1

    def _query(self, listener: Listener, client: UdpClient | TcpClient, data: bytes) -> None:
        try:
            query = dnsmsg.parse_query(data)
        except MessageError as exc:
            listener.malformed += 1
            log.debug("dns: %s: bad query: %s", listener.name, exc)
            if exc.reply is not None:
                self._reply(Reply(client, exc.reply, False))
            elif isinstance(client, TcpClient):
                client.reject()
            return
        listener.queries += 1
        try:
            self.upstreams()
        except Exception:           # an unreadable resolv.conf keeps the upstreams it had
            log.exception("dns: cannot read the upstreams")
        is_tcp = isinstance(client, TcpClient)
        self._run(self.forwarding.query(client, query, data, self.engine.now(), tcp=is_tcp))

    # -- actions -----------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        todo = list(actions)
        while todo:
            action = todo.pop(0)
            if isinstance(action, Reply):
                self._reply(action)
            elif isinstance(action, SendUdp):
                todo += self._send_udp(action)
            elif isinstance(action, SendTcp):
                todo += self._send_tcp(action)
            elif isinstance(action, CancelTcp):
                attempt = self._tcp.pop(action.key, None)
                if attempt is not None:
                    attempt.close()
        self._arm()

    def _reply(self, action: Reply) -> None:
        client = action.client
        assert isinstance(client, UdpClient | TcpClient)
        listener = client.listener
        assert isinstance(listener, Listener)
        if action.failed:
            listener.failures += 1
        if isinstance(client, TcpClient):
            client.send(action.data)
            return
        if listener.closed:
            return
        try:
            listener.udp.sendto(action.data, client.address)
        except OSError as exc:      # a full buffer: UDP may drop, the client asks again
            log.debug("dns: %s: reply to %s: %s", listener.name, client.address, exc)
            self.errors += 1

    def _sockaddr(self, upstream: Upstream) -> tuple[object, ...]:
        sockaddr = self._sockaddrs.get(upstream)
        if sockaddr is None:
            host = f"{upstream.host}%{upstream.scope}" if upstream.scope else upstream.host
            family = socket.AF_INET6 if upstream.family == 6 else socket.AF_INET
            info = socket.getaddrinfo(host, upstream.port, family, socket.SOCK_DGRAM, 0,
                                      socket.AI_NUMERICHOST)
            if len(self._sockaddrs) > 64:
                self._sockaddrs.clear()
            sockaddr = self._sockaddrs[upstream] = info[0][4]
        return sockaddr

    def _send_udp(self, action: SendUdp) -> list[Action]:
        upstream = action.upstream
        try:
            sock = self._upstream_socket(upstream.family)
            sock.sendto(action.data, self._sockaddr(upstream))
        except OSError as exc:      # no route, say: on to the next upstream
            log.debug("dns: send to %s: %s", upstream, exc)
            return self.forwarding.failed(action.key, upstream.key, self.engine.now())
        return []

    def _send_tcp(self, action: SendTcp) -> list[Action]:
        upstream = action.upstream
        key = action.key
        family = socket.AF_INET6 if upstream.family == 6 else socket.AF_INET
        try:
            self._tcp[key] = TcpUpstream(self.poller, self._sockaddr(upstream), family,
                                         action.data, lambda answer: self._tcp_done(key, answer))
        except OSError as exc:
            log.debug("dns: TCP to %s: %s", upstream, exc)
            return self.forwarding.failed(key, upstream.key, self.engine.now())
        return []

    def _tcp_done(self, key: int, answer: bytes | None) -> None:
        self._tcp.pop(key, None)
        now = self.engine.now()
        if answer is None:
            self._run(self.forwarding.failed(key, None, now))
        else:
            self._run(self.forwarding.tcp_answer(key, answer, now))

    # -- upstream sockets and the timer ------------------------------------------------

    def _upstream_socket(self, family: int) -> socket.socket:
        sock = self._sockets.get(family)
        if sock is None:
            if family == 6:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            sock.setblocking(False)
            self._sockets[family] = sock
            self.engine.add_reader(sock, lambda: self._on_upstream(sock))
        return sock

    def _on_upstream(self, sock: socket.socket) -> None:
        try:
            self._read_answers(sock)
            self._read_errors(sock)
        except Exception:
            self.errors += 1
            log.exception("dns: upstream socket failed")

    def _read_answers(self, sock: socket.socket) -> None:
        for _ in range(BATCH):
            try:
                n, source = sock.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:         # an ICMP error, reported again on the error queue
                continue
            data = bytes(self._buf[:n])
            self._run(self.forwarding.answer(data, source_key(source), self.engine.now()))

    def _read_errors(self, sock: socket.socket) -> None:
        for _ in range(BATCH):
            try:
                data, anc, _flags, dest = sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            if len(data) < 2 or not dest or _ee_errno(anc) not in UNREACHABLE:
                continue            # not about a query, or not fatal (EMSGSIZE, say)
            key = int.from_bytes(data[:2], "big")
            log.debug("dns: upstream %s unreachable", dest[0])
            self._run(self.forwarding.failed(key, source_key(dest), self.engine.now()))

    def _arm(self) -> None:
        if self._timer is not None:
            return
        deadline = self.forwarding.next_deadline()
        if deadline is not None:
            self._timer = self.engine.call_later(deadline - self.engine.now(), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._run(self.forwarding.expire(self.engine.now()))


def _ee_errno(ancdata: list[tuple[int, int, bytes]]) -> int:
    """``ee_errno`` of the ``sock_extended_err`` of an error-queue message, or 0."""
    for level, kind, data in ancdata:
        if ((level, kind) in ((socket.IPPROTO_IP, IP_RECVERR),
                              (socket.IPPROTO_IPV6, IPV6_RECVERR)) and len(data) >= 4):
            return int.from_bytes(data[:4], sys.byteorder)
    return 0
