"""The forwarding state of the DNS proxy, sans-IO: pending queries, upstreams, retries.

Theory of operation
-------------------
Every query the proxy forwards gets an entry in the pending table, keyed by a fresh
random 16-bit id, unique within the table: the id the upstream sees (the client's own id
is never sent on).  The entry remembers the client (an opaque handle of the I/O layer),
the client's id, the question, the query, the upstreams still to try and the deadline of
the current try.  Each try has the same timeout, so the table, kept in insertion order,
is also in deadline order: expiry pops from the front.

A try ends with an answer, a failure the I/O layer reports (ICMP port unreachable, a
TCP connection that fails) or its deadline; the two last move the query to the next
upstream under a new id.  An answer SERVFAIL or REFUSED does too, while an upstream is
left; after the last one the client gets that answer.  When no upstream is left, or none
is configured, or the table is full, the client gets SERVFAIL from the proxy itself
(``Reply.failed``).

Each try has a socket of its own in the I/O layer (a fresh one per try, on a port the
kernel picks: RFC 5452's source port randomisation), which reports what arrives on it
under the try's key.  An answer is accepted only on the socket of a try still pending,
from the upstream address and port that try went to, over the transport it used, with
the id and the question of the query (:func:`portproxy.dnsmsg.check_answer`); anything
else is dropped and counted (``dropped``, the reason in ``last_drop``) and the try goes
on waiting.  Whenever a try ends (answered, failed, timed out, moved to TCP) the table
says :class:`Close`, and the I/O layer closes that try's socket.

A truncated answer (TC) to a client that asked over TCP is asked again over TCP from the
same upstream; a UDP client gets it as it is and asks again over TCP itself, as RFC 1035
wants.

The upstream that answered last is tried first next time, so a dead first nameserver
costs one timeout, not one per query.

Who may ask at all is :class:`ClientFilter`'s business: a network's own VMs only (a
source address of its subnet, arriving on its bridge).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from portproxy import dnsmsg
from portproxy.dnsmsg import MessageError, Query, Question, Rcode
from portproxy.resolvconf import nameservers

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_TIMEOUT",
    "MAX_UPSTREAMS",
    "Action",
    "ClientFilter",
    "Close",
    "Forwarding",
    "Reply",
    "SendTcp",
    "SendUdp",
    "Upstream",
    "source_key",
    "upstreams_from_resolv",
]

DEFAULT_TIMEOUT = 1.5       # seconds per try
DEFAULT_MAX_PENDING = 4096
MAX_UPSTREAMS = 3           # glibc's MAXNS


@dataclass(frozen=True, slots=True)
class Upstream:
    """A nameserver: canonical address text (no scope), port, scope (v6 link-local)."""

    host: str
    port: int = 53
    scope: str = ""

    @classmethod
    def parse(cls, text: str, port: int = 53) -> Upstream:
        """From resolv.conf's form (``192.0.2.1``, ``fe80::1%eth0``); ValueError else."""
        address, _, scope = text.partition("%")
        return cls(str(ipaddress.ip_address(address)), port, scope)

    @property
    def family(self) -> int:
        return 6 if ":" in self.host else 4

    @property
    def key(self) -> tuple[str, int]:
        return self.host, self.port

    def __str__(self) -> str:
        host = f"{self.host}%{self.scope}" if self.scope else self.host
        return f"[{host}]:{self.port}" if self.family == 6 else f"{host}:{self.port}"


def source_key(sockaddr: tuple[object, ...]) -> tuple[str, int]:
    """The ``Upstream.key`` of an address as ``recvfrom`` gives it."""
    host = str(sockaddr[0]).partition("%")[0]
    return str(ipaddress.ip_address(host)), int(str(sockaddr[1]))


def upstreams_from_resolv(text: str, port: int = 53, exclude: Iterable[tuple[str, int]] = (),
                          limit: int = MAX_UPSTREAMS) -> tuple[Upstream, ...]:
    """The nameservers of a resolv.conf, in order, at most ``limit``; ``exclude`` (the
    proxy's own listen addresses: no loops) and unparseable entries left out."""
    skip = set(exclude)
    found: list[Upstream] = []
    for address in nameservers(text):
        try:
            upstream = Upstream.parse(address, port)
        except ValueError:
            continue
        if upstream.key not in skip and upstream not in found:
            found.append(upstream)
    return tuple(found[:limit])


@dataclass(frozen=True, slots=True)
class ClientFilter:
    """Who the proxy of one network answers: its VMs, and no one else.

    A client must have a source address in ``subnet`` that is none of the network's own
    (``own``: the gateway, the network and broadcast addresses; the host itself writes
    from the gateway address), and its datagram must have arrived on interface
    ``ifindex`` (the network's bridge; 0: any).  ``subnet`` None lets everyone in.
    """

    subnet: IPv4Network | IPv6Network | None = None
    own: frozenset[str] = frozenset()
    ifindex: int = 0

    @classmethod
    def network(cls, subnet: IPv4Network | IPv6Network, gateway: str,
                ifindex: int = 0) -> ClientFilter:
        own = {str(ipaddress.ip_address(gateway))}
        if subnet.num_addresses > 2:
            own |= {str(subnet.network_address), str(subnet.broadcast_address)}
        return cls(subnet, frozenset(own), ifindex)

    def allows(self, address: str, ifindex: int | None) -> str | None:
        """None if the client at ``address`` may ask, else why not.  ``ifindex`` is
        where its datagram arrived; None where the kernel has checked it already (a
        socket bound to the device)."""
        if ifindex is not None and self.ifindex and ifindex != self.ifindex:
            return f"arrived on interface {ifindex}, not the network's ({self.ifindex})"
        if self.subnet is None:
            return None
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return f"source {address!r} is not an address"
        if ip.version != self.subnet.version or ip not in self.subnet:
            return f"source {ip} is outside {self.subnet}"
        if str(ip) in self.own:
            return f"source {ip} is the network's own address"
        return None


@dataclass(frozen=True, slots=True)
class SendUdp:
    key: int
    upstream: Upstream
    data: bytes


@dataclass(frozen=True, slots=True)
class SendTcp:
    key: int
    upstream: Upstream
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Try ``key`` is over: close its socket (UDP or TCP)."""

    key: int


@dataclass(frozen=True, slots=True)
class Reply:
    client: object
    data: bytes
    failed: bool        # the proxy answered SERVFAIL itself: no upstream answered
    # when the query came (None: not a forwarded query); not part of what a reply is
    started: float | None = field(default=None, compare=False)


Action = SendUdp | SendTcp | Close | Reply


@dataclass(slots=True)
class _Pending:
    client: object
    query: Query
    data: bytes
    tcp_client: bool
    upstreams: list[Upstream]
    key: int = -1
    via_tcp: bool = False
    deadline: float = 0.0
    last_answer: bytes | None = None
    started: float = 0.0


class Forwarding:
    """The pending table.  Each method returns the actions the I/O layer must take."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 randbits: Callable[[int], int] = secrets.randbits) -> None:
        if timeout <= 0 or not 1 <= max_pending <= 32768:
            raise ValueError("timeout must be positive, max_pending within 1..32768")
        self.timeout = timeout
        self.max_pending = max_pending
        self.upstreams: tuple[Upstream, ...] = ()
        self.dropped = 0            # answers that matched no pending query
        self.last_drop = ""         # why the last one was dropped (for the log)
        self._randbits = randbits
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._good: Upstream | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def next_deadline(self) -> float | None:
        for entry in self._pending.values():
            return entry.deadline
        return None

    def query(self, client: object, query: Query, data: bytes, now: float, *,
              tcp: bool = False) -> list[Action]:
        """Forward ``query`` (``data``, as the client sent it) for ``client``."""
        if not self.upstreams or len(self._pending) >= self.max_pending:
            return [Reply(client, dnsmsg.servfail(query), True, now)]
        entry = _Pending(client, query, data, tcp, self._order(), started=now)
        return self._send(entry, now)

    def answer(self, key: int, data: bytes, source: tuple[str, int],
               now: float) -> list[Action]:
        """A datagram from ``source`` (an ``Upstream.key``) on the socket of try ``key``."""
        entry = self._pending.get(key)
        if entry is None:
            return self._drop("no such try (late, or already answered)")
        if entry.via_tcp:
            return self._drop("a datagram for a try over TCP")
        if entry.upstreams[0].key != source:
            return self._drop(f"from {source[0]}:{source[1]}, not {entry.upstreams[0]}")
        reason = _mismatch(data, entry.key, entry.query.question)
        if reason is not None:
            return self._drop(reason)
        return self._accept(entry, data, now)

    def tcp_answer(self, key: int, data: bytes, now: float) -> list[Action]:
        """The answer read from the TCP connection of try ``key``."""
        entry = self._pending.get(key)
        if entry is None or not entry.via_tcp:
            self._drop("no such try over TCP")
            return []
        reason = _mismatch(data, entry.key, entry.query.question)
        if reason is not None:
            self._drop(reason)
            return self.failed(key, None, now)
        return self._accept(entry, data, now)

    def failed(self, key: int, source: tuple[str, int] | None, now: float) -> list[Action]:
        """Try ``key`` failed (from ``source``, when known): on to the next upstream."""
        entry = self._pending.get(key)
        if entry is None or (source is not None and entry.upstreams[0].key != source):
            return []
        del self._pending[key]
        return [Close(key), *self._next(entry, now)]

    def expire(self, now: float) -> list[Action]:
        """Move every try whose deadline has passed on to the next upstream."""
        actions: list[Action] = []
        while self._pending:
            key, entry = next(iter(self._pending.items()))
            if entry.deadline > now:
                break
            actions += self.failed(key, None, now)
        return actions

    # -- internals ---------------------------------------------------------------------

    def _order(self) -> list[Upstream]:
        upstreams = list(self.upstreams)
        if self._good in upstreams:
            at = upstreams.index(self._good)
            upstreams = upstreams[at:] + upstreams[:at]
        return upstreams

    def _fresh_key(self) -> int:
        while True:
            key = self._randbits(16)
            if key not in self._pending:
                return key

    def _send(self, entry: _Pending, now: float) -> list[Action]:
        entry.key = self._fresh_key()
        entry.deadline = now + self.timeout
        self._pending[entry.key] = entry
        data = dnsmsg.with_id(entry.data, entry.key)
        if entry.via_tcp:
            return [SendTcp(entry.key, entry.upstreams[0], data)]
        return [SendUdp(entry.key, entry.upstreams[0], data)]

    def _next(self, entry: _Pending, now: float) -> list[Action]:
        entry.upstreams.pop(0)
        entry.via_tcp = False
        if entry.upstreams:
            return self._send(entry, now)
        if entry.last_answer is not None:
            return [Reply(entry.client, entry.last_answer, False, entry.started)]
        return [Reply(entry.client, dnsmsg.servfail(entry.query), True, entry.started)]

    def _drop(self, reason: str) -> list[Action]:
        self.dropped += 1
        self.last_drop = reason
        return []

    def _accept(self, entry: _Pending, data: bytes, now: float) -> list[Action]:
        del self._pending[entry.key]
        done: list[Action] = [Close(entry.key)]
        header = dnsmsg.Header.parse(data)
        if header.tc and entry.tcp_client and not entry.via_tcp:
            entry.via_tcp = True
            return done + self._send(entry, now)
        reply = dnsmsg.with_id(data, entry.query.id)
        if header.rcode in (Rcode.SERVFAIL, Rcode.REFUSED) and len(entry.upstreams) > 1:
            entry.last_answer = reply
            return done + self._next(entry, now)
        self._good = entry.upstreams[0]
        return [*done, Reply(entry.client, reply, False, entry.started)]


def _mismatch(data: bytes, id: int, question: Question) -> str | None:
    """None if ``data`` answers query ``id`` asking ``question``, else why not."""
    try:
        dnsmsg.check_answer(data, id, question)
    except MessageError as exc:
        return str(exc)
    return None
