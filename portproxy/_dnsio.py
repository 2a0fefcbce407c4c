"""The I/O half of the DNS proxy: listeners, upstream sockets, the pending table's timer.

Theory of operation: each listener is a UDP socket and a TCP listening socket on one
address (a network's gateway, port 53), watched by the engine.  A query is parsed
(:mod:`portproxy.dnsmsg`), handed to the pending table (:mod:`portproxy.dnsstate`), and
the actions the table returns are carried out here: each UDP try to an upstream gets a
socket of its own, made for it and closed when the table says the try is over, on a port
the kernel picks at random (RFC 5452: a spoofer must guess the port as well as the id);
TCP tries and TCP clients live in :mod:`portproxy._dnstcp`.  One engine timer follows the
table's earliest deadline.

Only the network's own VMs are answered (:class:`portproxy.dnsstate.ClientFilter`).  The
TCP listener is bound to the network's bridge (SO_BINDTODEVICE), so the kernel refuses a
connection that arrives elsewhere, and an accepted one from a source outside the subnet
is reset unanswered.  The UDP socket reads the arriving interface of every datagram
(IP_PKTINFO) and drops, unanswered, what did not come from the bridge or from the subnet:
no reply at all, not even an ICMP error, which a socket bound to the device would make
the kernel send.

The upstream sockets set IP_RECVERR / IPV6_RECVERR: an ICMP error (port unreachable: no
server there) comes back on the try's socket's error queue, and the try moves on to the
next upstream at once instead of waiting for its timeout.

Nothing a client or an upstream sends can stop the loop: every handler catches what it
does not expect, logs it and counts it (``errors``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import TYPE_CHECKING, NamedTuple

from portproxy import dnsmsg
from portproxy._dnstcp import TcpClient, TcpUpstream
from portproxy.dnsmsg import MessageError, Rcode
from portproxy.dnsstate import (
    DEFAULT_MAX_PENDING,
    DEFAULT_TIMEOUT,
    MAX_UPSTREAMS,
    Action,
    ClientFilter,
    Close,
    Forwarding,
    Reply,
    SendTcp,
    SendUdp,
    Upstream,
    source_key,
)
from portproxy.histogram import Histogram
from portproxy.sockets import listen

if TYPE_CHECKING:
    from portproxy.loop import EventLoop, TimerHandle

__all__ = ["DEFAULT_IDLE_TIMEOUT", "DnsServer", "Listener"]

log = logging.getLogger("hns.daemon.dns")

BATCH = 64
MAX_DATAGRAM = 65535
DEFAULT_IDLE_TIMEOUT = 10.0
DEFAULT_MAX_TCP_CLIENTS = 256
IP_PKTINFO = 8              # linux/in.h; not exported by Python's socket module
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
    filter: ClientFilter = field(default_factory=ClientFilter)
    device: str = ""        # the bridge the listener serves ("": any interface)
    queries: int = 0
    failures: int = 0       # answered SERVFAIL by the proxy (no upstream answered)
    malformed: int = 0      # refused (FORMERR, NOTIMP) or dropped
    ignored: int = 0        # not from the network's VMs: dropped or reset, unanswered
    answers: int = 0        # replies to queries (forwarded answers and the proxy's own)
    servfail: int = 0       # of them SERVFAIL, the proxy's own or an upstream's
    latency: Histogram = field(default_factory=Histogram)   # query to reply, seconds
    closed: bool = False
    clients: set[TcpClient] = field(default_factory=set)


class UdpClient(NamedTuple):
    listener: Listener
    address: tuple[str, int]


class DnsServer:
    """Answers DNS on its listeners by forwarding to ``upstreams()`` (called per query;
    it should be cheap and return the same tuple while nothing changed)."""

    def __init__(self, engine: EventLoop, upstreams: Callable[[], tuple[Upstream, ...]], *,
                 timeout: float = DEFAULT_TIMEOUT, max_pending: int = DEFAULT_MAX_PENDING,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_tcp_clients: int = DEFAULT_MAX_TCP_CLIENTS) -> None:
        self.engine = engine
        self.forwarding = Forwarding(timeout=timeout, max_pending=max_pending)
        self.idle_timeout = idle_timeout
        self.max_tcp_clients = max_tcp_clients
        self.errors = 0
        self._upstreams = upstreams
        self._configured: tuple[Upstream, ...] | None = None
        self._listeners: list[Listener] = []
        self._udp: dict[int, socket.socket] = {}        # try key -> its socket
        self._sockaddrs: dict[Upstream, tuple[object, ...]] = {}
        self._tcp: dict[int, TcpUpstream] = {}
        self._tcp_clients = 0
        self._timer: TimerHandle | None = None
        self._buf = bytearray(MAX_DATAGRAM)

    # -- listeners ---------------------------------------------------------------------

    def listen(self, name: str, host: str, port: int = 53, *, device: str = "",
               subnet: IPv4Network | None = None) -> Listener:
        """Serve ``host``:``port`` (UDP and TCP) to clients of ``subnet`` arriving on
        ``device`` (see the module; empty/None: anyone); OSError if either cannot be
        bound or the device does not exist."""
        ifindex = interface_index(device) if device else 0
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            udp.bind((host, port))     # no SO_REUSEADDR: a second server must not hide
            udp.setblocking(False)
            tcp = listen(socket.AF_INET, socket.SOCK_STREAM, host, udp.getsockname()[1],
                         device=device)
        except BaseException:
            udp.close()
            raise
        client_filter = (ClientFilter.network(subnet, host, ifindex) if subnet is not None
                         else ClientFilter(ifindex=ifindex))
        listener = Listener(name, host, udp.getsockname()[1], udp, tcp, client_filter, device)
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
        for key in list(self._tcp) + list(self._udp):
            self._close_try(key)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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
                n, anc, _flags, address = listener.udp.recvmsg_into([self._buf], PKTINFO_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("dns: %s: receive: %s", listener.name, exc)
                continue
            if self._foreign(listener, address[0], _arrived_on(anc)):
                continue
            self._query(listener, UdpClient(listener, address), bytes(self._buf[:n]))

    def _foreign(self, listener: Listener, address: str, ifindex: int | None) -> bool:
        """True (and counted) if the client is not one of the network's VMs."""
        reason = listener.filter.allows(address, ifindex)
        if reason is None:
            return False
        listener.ignored += 1
        log.debug("dns: %s: ignoring %s: %s", listener.name, address, reason)
        return True

    def _on_accept(self, listener: Listener) -> None:
        for _ in range(BATCH):
            try:
                sock, address = listener.tcp.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # out of fds, say: try again on the next wake-up
                log.warning("dns: %s: accept: %s", listener.name, exc)
                return
            if self._foreign(listener, address[0], None):     # the device: the kernel's
                _reset(sock)
                continue
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
            elif isinstance(action, Close):
                self._close_try(action.key)
        self._arm()

    def _close_try(self, key: int) -> None:
        sock = self._udp.pop(key, None)
        if sock is not None:
            self.engine.remove_reader(sock)
            sock.close()
        attempt = self._tcp.pop(key, None)
        if attempt is not None:
            attempt.close()

    def _reply(self, action: Reply) -> None:
        client = action.client
        assert isinstance(client, UdpClient | TcpClient)
        listener = client.listener
        assert isinstance(listener, Listener)
        if action.failed:
            listener.failures += 1
        if action.started is not None:
            listener.answers += 1
            listener.latency.observe(self.engine.now() - action.started)
            if (len(action.data) >= dnsmsg.HEADER_LEN
                    and dnsmsg.Header.parse(action.data).rcode == Rcode.SERVFAIL):
                listener.servfail += 1
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
            sock = self._try_socket(action.key, upstream.family)
            sock.sendto(action.data, self._sockaddr(upstream))
        except OSError as exc:      # no route, out of fds, say: on to the next upstream
            log.debug("dns: send to %s: %s", upstream, exc)
            return self.forwarding.failed(action.key, upstream.key, self.engine.now())
        return []

    def _send_tcp(self, action: SendTcp) -> list[Action]:
        upstream = action.upstream
        key = action.key
        family = socket.AF_INET6 if upstream.family == 6 else socket.AF_INET
        try:
            self._tcp[key] = TcpUpstream(self.engine, self._sockaddr(upstream), family,
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

    def _try_socket(self, key: int, family: int) -> socket.socket:
        """A new unbound socket for try ``key``: its first sendto takes a port the
        kernel picks at random among the ephemeral ones."""
        if family == 6:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            sock.setblocking(False)
            self.engine.add_reader(sock, lambda: self._on_upstream(key, sock))
        except BaseException:
            sock.close()
            raise
        self._udp[key] = sock
        return sock

    def _on_upstream(self, key: int, sock: socket.socket) -> None:
        try:
            self._read_answers(key, sock)
            if self._udp.get(key) is sock:
                self._read_errors(key, sock)
        except Exception:
            self.errors += 1
            log.exception("dns: upstream socket failed")

    def _read_answers(self, key: int, sock: socket.socket) -> None:
        for _ in range(BATCH):
            if self._udp.get(key) is not sock:
                return              # the try is over: its socket was closed
            try:
                n, source = sock.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:         # an ICMP error: read from the error queue
                return
            data = bytes(self._buf[:n])
            dropped = self.forwarding.dropped
            self._run(self.forwarding.answer(key, data, source_key(source), self.engine.now()))
            if self.forwarding.dropped != dropped:
                log.debug("dns: answer from %s dropped: %s", source[0],
                          self.forwarding.last_drop)

    def _read_errors(self, key: int, sock: socket.socket) -> None:
        for _ in range(BATCH):
            if self._udp.get(key) is not sock:
                return
            try:
                _data, anc, _flags, dest = sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            if not dest or _ee_errno(anc) not in UNREACHABLE:
                continue            # not fatal (EMSGSIZE, say)
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


PKTINFO_SPACE = socket.CMSG_SPACE(12)       # struct in_pktinfo


def _arrived_on(ancdata: list[tuple[int, int, bytes]]) -> int:
    """``ipi_ifindex`` of the IP_PKTINFO of a received datagram (0: none given)."""
    for level, kind, data in ancdata:
        if (level, kind) == (socket.IPPROTO_IP, IP_PKTINFO) and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder)
    return 0


def interface_index(device: str) -> int:
    """The index of interface ``device``; OSError(ENODEV) if there is none."""
    try:
        return socket.if_nametoindex(device)
    except OSError:
        raise OSError(errno.ENODEV, f"no interface {device!r}") from None


def _reset(sock: socket.socket) -> None:
    """Close an accepted connection with a reset: no answer, no orderly end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _ee_errno(ancdata: list[tuple[int, int, bytes]]) -> int:
    """``ee_errno`` of the ``sock_extended_err`` of an error-queue message, or 0."""
    for level, kind, data in ancdata:
        if ((level, kind) in ((socket.IPPROTO_IP, IP_RECVERR),
                              (socket.IPPROTO_IPV6, IPV6_RECVERR)) and len(data) >= 4):
            return int.from_bytes(data[:4], sys.byteorder)
    return 0
