"""The I/O half of the UDP relay: a socket per flow, as the ``portproxy.udp`` table says.

Theory of operation: the listening socket and every flow socket are level-triggered and
read in bounded batches.  A datagram from a client goes out on its flow's socket (opened
on the first datagram, connected to the target); a datagram on a flow socket goes back to
that flow's client from the listening socket.  One timer per relay, set to the table's
next expiry, closes idle flows.  UDP may drop: a datagram that meets a full socket buffer
is dropped (and counted as an error), never queued.

A listening socket bound to a wildcard address (0.0.0.0 or ::) learns, with
IP_PKTINFO / IPV6_RECVPKTINFO, which local address each flow's first datagram was sent
to, and answers from that address (as docker-proxy does): a client never sees a reply
from an address it did not talk to.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from portproxy._relay import Address, Relay, family_of
from portproxy.udp import CloseFlow, Flow, FlowAction, FlowTable, OpenFlow

if TYPE_CHECKING:
    from portproxy.loop import Loop, TimerHandle

__all__ = ["UdpRelay", "dial_udp"]

log = logging.getLogger("portproxy.engine")

BATCH = 64                  # datagrams read per wake-up of a socket
MAX_DATAGRAM = 65535
IP_PKTINFO = 8              # linux/in.h; not exported by Python's socket module
_ANC_SIZE = socket.CMSG_SPACE(20)


def dial_udp(address: Address,
             factory: Callable[[int, int], socket.socket] = socket.socket) -> socket.socket:
    """A non-blocking UDP socket connected to ``address`` (``factory`` as for dial_tcp)."""
    sock = factory(family_of(address[0]), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


class UdpRelay(Relay):
    """A bound datagram socket whose clients are relayed to ``connect``, a flow each."""

    protocol = "udp"

    def __init__(self, loop: Loop, sock: socket.socket, connect: Address, *, name: str,
                 dial: Callable[[Address], socket.socket], idle_timeout: float,
                 max_flows: int) -> None:
        listen = sock.getsockname()[:2]
        super().__init__(name, listen, connect)
        self.loop = loop
        self.sock = sock
        self.dial = dial
        self.table = FlowTable(idle_timeout, max_flows)
        self._buf = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buf)
        self._sweep: TimerHandle | None = None
        self._pktinfo = ipaddress.ip_address(listen[0].split("%")[0]).is_unspecified

    def live(self) -> int:
        return len(self.table)

    def start(self) -> None:
        self.sock.setblocking(False)
        if self._pktinfo:
            if self.sock.family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.loop.add(self.sock.fileno(), select.EPOLLIN, self._on_datagram)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._apply(self.table.clear())
        with contextlib.suppress(OSError):
            self.loop.remove(self.sock.fileno())
        self.sock.close()

    # -- client -> target --------------------------------------------------------------

    def _on_datagram(self, _mask: int) -> None:
        for _ in range(BATCH):
            try:
                n, client, local = self._receive()
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("%s: receive: %s", self.name, exc)
                self.errors += 1
                continue
            flow, actions = self.table.from_client(client, self.loop.now())
            if actions:
                self._apply(actions, local)
            target = flow.handle
            if isinstance(target, socket.socket) and self._send(target.send, self._view[:n]):
                self.bytes_up += n
            if self._sweep is None:
                self._schedule_sweep()

    def _receive(self) -> tuple[int, Any, bytes | None]:
        if not self._pktinfo:
            n, client = self.sock.recvfrom_into(self._buf)
            return n, client, None
        n, ancdata, _flags, client = self.sock.recvmsg_into([self._buf], _ANC_SIZE)
        for level, kind, data in ancdata:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                return n, client, data[8:12]          # in_pktinfo.ipi_addr
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                return n, client, data[:16]           # in6_pktinfo.ipi6_addr
        return n, client, None

    def _send(self, send: Callable[..., int], data: object, *args: Any) -> bool:
        try:
            send(data, *args)
        except OSError as exc:     # a full buffer drops; ECONNREFUSED reports an old ICMP
            log.debug("%s: send: %s", self.name, exc)
            self.errors += 1
            return False
        return True

    # -- flows -------------------------------------------------------------------------

    def _apply(self, actions: list[FlowAction], local: bytes | None = None) -> None:
        for action in actions:
            if isinstance(action, OpenFlow):
                self._open(action.flow, local)
            elif isinstance(action, CloseFlow):
                self._close(action.flow)

    def _open(self, flow: Flow, local: bytes | None) -> None:
        try:
            target = self.dial(self.connect)
        except OSError as exc:
            log.debug("%s: dial %s: %s", self.name, self.connect, exc)
            self.errors += 1
            self.table.remove(flow)
            return
        flow.handle = target
        self.accepted += 1
        reply = self._reply_function(flow.client, local)
        self.loop.add(target.fileno(), select.EPOLLIN,
                              lambda _mask: self._on_reply(flow, target, reply))

    def _close(self, flow: Flow) -> None:
        target = flow.handle
        flow.handle = None
        if isinstance(target, socket.socket):
            self.loop.remove(target.fileno())
            target.close()

    def _reply_function(self, client: Any, local: bytes | None) -> Callable[[memoryview], bool]:
        sock = self.sock
        if local is None:
            return lambda data: self._send(sock.sendto, data, client)
        if len(local) == 4:
            cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, local, bytes(4)))]
        else:
            cmsg = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("=16si", local, 0))]
        return lambda data: self._send(sock.sendmsg, [data], cmsg, 0, client)

    # -- target -> client --------------------------------------------------------------

    def _on_reply(self, flow: Flow, target: socket.socket,
                  reply: Callable[[memoryview], bool]) -> None:
        for _ in range(BATCH):
            try:
                n = target.recv_into(self._buf)
            except BlockingIOError:
                return
            except OSError as exc:                   # ECONNREFUSED: the target's port is shut
                log.debug("%s: flow %s: %s", self.name, flow.client, exc)
                self.errors += 1
                continue
            if not self.table.from_target(flow, self.loop.now()):
                return
            if reply(self._view[:n]):
                self.bytes_down += n

    def _schedule_sweep(self) -> None:
        expiry = self.table.next_expiry()
        if expiry is not None:
            self._sweep = self.loop.call_later(expiry - self.loop.now(), self._on_sweep)

    def _on_sweep(self) -> None:
        self._sweep = None
        self._apply(self.table.expire(self.loop.now()))
        self._schedule_sweep()
