"""The port tracker: which sockets listen inside a VM's network namespace.

Theory of operation
-------------------
The kernel tells who listens through ``NETLINK_SOCK_DIAG``: one ``inet_diag_req_v2``
dump per family x protocol (TCP in state LISTEN; UDP in state CLOSE, i.e. bound and not
connected), answered with one ``inet_diag_msg`` per socket, plus ``INET_DIAG_SKV6ONLY``
for AF_INET6 sockets (the kernel adds it unasked).  A dump costs about 20 us from
Python, four of them 85-150 us: four dumps per VM every 40 ms would cost 4-8 % of a
core for 20 VMs.  So a cheap gate comes first: ``/proc/net/sockstat`` and ``sockstat6``
of the namespace (``pread`` of a file kept open: 2-3 us each in a tight loop, 6-10 us
in a daemon that sleeps between polls, its caches cold) count the sockets *in use* per
protocol -- hashed sockets: a ``listen()``, the ``close()`` of a listener and a UDP
``bind()`` all change the count (so do connections; that costs a dump, not a mistake).
:meth:`VmTracker.poll` reads the gate -- the counters of the namespace in ``sockstat``
(sockets used, TCP in use and in time-wait, UDP in use; the lines also hold machine-wide
counters, which change all the time) and ``sockstat6`` whole -- and dumps the family x
protocol whose in-use count changed.  When only the other counters moved (a connection
went to time-wait, a socket was made or freed) a change may hide behind equal in-use
counts -- a ``listen()`` while a connection closes -- so all four are dumped; without
that, a VM with connections coming and going missed listeners until the safety net.
That safety net is all four dumps every ``full_interval``: a listener closed and
another opened between two polls leave every counter equal.  Measured in the daemon
(2 vCPUs, virtualised): an idle poll of one VM costs 20-25 us, a wake-up of the loop
100-200 us, a full poll 200-300 us; so the forwarder polls every VM every 20 ms + 1 ms
per VM (40 ms for 20 VMs, about 1.4 % of a core) and makes the full dumps every 2 s
(0.3 % more for 20 VMs; every second it was 0.6 %): a new listener is seen within one
poll interval, a replaced one within 2 s.

Namespaces: the netlink socket and the sockstat files are opened by a short-lived thread
inside the VM namespace (an executor of the caller's
:class:`~portproxy.namespaces.Namespaces`) and then used from the engine thread: a
socket stays in the namespace it was created in, and a ``/proc`` file shows the
namespace of its opener. The files are opened as ``/proc/thread-self/net/...``:
``/proc/net`` is ``/proc/self/net``, the namespace of the process's *main* thread, not
of the opening thread. ``ip_local_port_range`` (a per-namespace sysctl) is read once, by
the same thread.

Ephemeral ports (decision): a TCP socket in LISTEN is always a server, whatever its port
(a ``listen()`` without ``bind()`` gets an ephemeral one and is still tracked, as WSL
does).  A UDP socket counts only when it is not connected (destination port 0, state
CLOSE) and its port is outside the VM's ``ip_local_port_range``: a client's
``sendto()`` without ``bind()`` binds such a socket to an ephemeral port, and those are
the VM's own outgoing traffic (resolvers, NTP), never servers to forward.  A UDP server
bound to a port inside the ephemeral range is therefore not forwarded.

Connections that outlive their listener (mirrored mode only, ``track_connected``): WSL
keeps a port the VM's while a connection the VM accepted on it lives.  The dumps stay
LISTEN-only, so the cost above holds; when a TCP dump shows that a port lost its last
listener of that family, one more dump of that family asks for the connected states
(``CONNECTED_STATES``: established or closing, not TIME_WAIT nor CLOSE), and the ports
among the lost ones with sockets whose *local* port it is (accepted connections; the
daemon's own dials into the VM have it as their remote port) are ``connected_ports``,
with their number of connections.  Each later dump of that family repeats the extra
dump while the set is not empty; the end of a connection changes the in-use count, so
the gate sees it.  ``poll`` says "changed" when a port enters or leaves that set.

The pure half (request building, response parsing, the gate, the rule above) works on
bytes and is unit-tested with crafted messages; :class:`VmTracker` is the thin I/O.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from portproxy.namespaces import Namespaces

__all__ = [
    "CONNECTED_STATES",
    "DUMPS",
    "DiagError",
    "DiagSocket",
    "Dump",
    "VmTracker",
    "build_request",
    "dumps_for",
    "gate_v4",
    "is_listening",
    "lingering",
    "parse_messages",
    "parse_port_range",
    "parse_sockstat",
    "read_port_range",
]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x001
NLM_F_DUMP = 0x300            # NLM_F_ROOT | NLM_F_MATCH
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_ESTABLISHED = 1
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11
# a connection that lives (accepted: SYN_SENT is an outgoing one, TIME_WAIT has ended)
CONNECTED_STATES = frozenset({TCP_ESTABLISHED, TCP_SYN_RECV, TCP_FIN_WAIT1, TCP_FIN_WAIT2,
                              TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING})
CONNECTED_MASK = sum(1 << state for state in CONNECTED_STATES)
INET_DIAG_SKV6ONLY = 11
IPPROTO_TCP = 6
IPPROTO_UDP = 17
PROTOCOLS = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}
DEFAULT_PORT_RANGE = (32768, 60999)   # the kernel's default ip_local_port_range
PORT_RANGE_PATH = "/proc/sys/net/ipv4/ip_local_port_range"

_NLMSGHDR = struct.Struct("=IHHII")            # len, type, flags, seq, pid
_REQ = struct.Struct("=BBBxI48x")              # inet_diag_req_v2, sockid left zero
_MSG = struct.Struct("=BB2x")                  # inet_diag_msg: family, state, ...
_PORTS = struct.Struct(">HH")                  # ... id.sport, id.dport (big endian)
_MSG_SIZE = 72                                 # sizeof(struct inet_diag_msg)
_RTA = struct.Struct("=HH")                    # rtattr: len, type
_ERR = struct.Struct("=i")
RECV_SIZE = 64 * 1024
Bytes = bytes | bytearray | memoryview

log = logging.getLogger("hns.daemon")

# sockstat names of the in-use counters and the dump each one gates
_INUSE = re.compile(rb"^(TCP6?|UDP6?): inuse (\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Dump:
    """One family x protocol of sock_diag, with the sockstat counter that gates it."""

    family: int
    protocol: int
    counter: str

    @property
    def states(self) -> int:
        """The socket states asked for: LISTEN for TCP, CLOSE (bound, unconnected) for UDP."""
        return 1 << (TCP_LISTEN if self.protocol == IPPROTO_TCP else TCP_CLOSE)


DUMPS = (Dump(socket.AF_INET, IPPROTO_TCP, "TCP"), Dump(socket.AF_INET6, IPPROTO_TCP, "TCP6"),
         Dump(socket.AF_INET, IPPROTO_UDP, "UDP"), Dump(socket.AF_INET6, IPPROTO_UDP, "UDP6"))


class DiagError(OSError):
    """The kernel answered a dump with an error (e.g. ENOENT: no udp_diag module)."""


@dataclass(frozen=True, order=True)
class DiagSocket:
    """A socket as sock_diag reports it (addresses as text, ports as numbers)."""

    protocol: str            # "tcp" | "udp"
    family: int              # socket.AF_INET | socket.AF_INET6
    address: str
    port: int
    state: int
    dport: int = 0
    v6only: bool = False
    inode: int = 0


def build_request(family: int, protocol: int, states: int, seq: int = 1) -> bytes:
    """A ``SOCK_DIAG_BY_FAMILY`` dump request (nlmsghdr + inet_diag_req_v2)."""
    body = _REQ.pack(family, protocol, 0, states)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                          NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_messages(data: Bytes, protocol: int, seq: int | None = None
                   ) -> tuple[list[DiagSocket], bool]:
    """The sockets in one ``recv`` of a dump, and whether the dump is done.

    Messages of another sequence number are skipped; ``NLMSG_ERROR`` raises
    :class:`DiagError`; a truncated message raises ``ValueError``.
    """
    sockets: list[DiagSocket] = []
    offset, end = 0, len(data)
    while offset + _NLMSGHDR.size <= end:
        length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > end:
            raise ValueError(f"truncated netlink message at {offset}")
        body = offset + _NLMSGHDR.size
        if seq is None or msg_seq == seq:
            if kind == NLMSG_DONE:
                return sockets, True
            if kind == NLMSG_ERROR:
                code = -_ERR.unpack_from(data, body)[0] if length >= body - offset + 4 else 0
                if code:
                    raise DiagError(code, f"sock_diag: {os.strerror(code)}")
                return sockets, True      # an acknowledgement
            if kind == SOCK_DIAG_BY_FAMILY:
                sockets.append(_parse_socket(data, body, offset + length, protocol))
        offset += (length + 3) & ~3
    return sockets, False


def _parse_socket(data: Bytes, start: int, end: int, protocol: int) -> DiagSocket:
    if end - start < _MSG_SIZE:
        raise ValueError("truncated inet_diag_msg")
    family, state = _MSG.unpack_from(data, start)
    sport, dport = _PORTS.unpack_from(data, start + 4)
    if family == socket.AF_INET:
        address = socket.inet_ntop(socket.AF_INET, data[start + 8:start + 12])
    else:
        address = socket.inet_ntop(socket.AF_INET6, data[start + 8:start + 24])
    inode = struct.unpack_from("=I", data, start + 68)[0]
    v6only = False
    offset = start + _MSG_SIZE
    while offset + _RTA.size <= end:
        rta_len, rta_type = _RTA.unpack_from(data, offset)
        if rta_len < _RTA.size:
            break
        if rta_type == INET_DIAG_SKV6ONLY and rta_len > _RTA.size:
            v6only = data[offset + _RTA.size] != 0
        offset += (rta_len + 3) & ~3
    return DiagSocket(PROTOCOLS.get(protocol, str(protocol)), family, address, sport, state,
                      dport, v6only, inode)


def parse_sockstat(data: bytes) -> dict[str, int]:
    """The in-use counters of ``/proc/net/sockstat`` (TCP, UDP) or ``sockstat6``."""
    return {name.decode(): int(value) for name, value in _INUSE.findall(data)}


def gate_v4(data: bytes) -> bytes:
    """The counters of the namespace in ``/proc/net/sockstat`` that the gate compares:
    sockets used, TCP in use, TCP time-wait, UDP in use (a few C-level calls; the lines
    also hold machine-wide counters, which change all the time).  ``sockstat6`` holds
    nothing but counters of the namespace and is compared whole."""
    used = data.find(b"used ") + 5
    tcp = data.find(b"TCP: inuse ", used) + 11
    tw = data.find(b" tw ", tcp) + 4
    udp = data.find(b"UDP: inuse ", tw) + 11
    return b"/".join((data[used:data.find(b"\n", used)], data[tcp:data.find(b" ", tcp)],
                      data[tw:data.find(b" ", tw)], data[udp:data.find(b" ", udp)]))


def dumps_for(old: Mapping[str, int] | None, new: Mapping[str, int]) -> list[Dump]:
    """The dumps whose gate changed (every dump when there is no earlier reading)."""
    if old is None:
        return list(DUMPS)
    return [d for d in DUMPS if old.get(d.counter) != new.get(d.counter)]


def parse_port_range(text: str) -> tuple[int, int]:
    """``ip_local_port_range`` ("32768\\t60999") as (low, high)."""
    fields = text.split()
    if len(fields) != 2:
        raise ValueError(f"bad ip_local_port_range {text!r}")
    low, high = int(fields[0]), int(fields[1])
    if not 0 < low <= high < 65536:
        raise ValueError(f"bad ip_local_port_range {text!r}")
    return low, high


def read_port_range(path: str = PORT_RANGE_PATH) -> tuple[int, int]:
    """The ephemeral port range of the calling thread's namespace (a sysctl of the
    namespace: ``/proc/sys/net`` shows the opener's); the kernel's default if unreadable."""
    try:
        with open(path) as f:
            return parse_port_range(f.read())
    except (OSError, ValueError):
        return DEFAULT_PORT_RANGE


def is_listening(sock: DiagSocket, port_range: tuple[int, int] = DEFAULT_PORT_RANGE) -> bool:
    """A server socket: TCP in LISTEN; UDP unconnected, bound outside the ephemeral range."""
    if sock.protocol == "tcp":
        return sock.state == TCP_LISTEN
    if sock.protocol == "udp":
        low, high = port_range
        return (sock.dport == 0 and sock.state == TCP_CLOSE and sock.port != 0
                and not low <= sock.port <= high)
    return False


def listening(sockets: Iterable[DiagSocket],
              port_range: tuple[int, int] = DEFAULT_PORT_RANGE) -> frozenset[DiagSocket]:
    return frozenset(s for s in sockets if is_listening(s, port_range))


def lingering(watched: Iterable[int], sockets: Iterable[DiagSocket]) -> dict[int, int]:
    """Of the ``watched`` ports, those that are the local port of TCP sockets in a
    connected state (``CONNECTED_STATES``), each with the number of such sockets."""
    ports = frozenset(watched)
    found: dict[int, int] = {}
    for sock in sockets:
        if sock.protocol == "tcp" and sock.state in CONNECTED_STATES and sock.port in ports:
            found[sock.port] = found.get(sock.port, 0) + 1
    return found


# -- I/O -----------------------------------------------------------------------------------


@dataclass
class _Handles:
    netlink: socket.socket
    sockstat: int
    sockstat6: int
    port_range: tuple[int, int]


def _open_handles() -> _Handles:
    """Run inside the VM namespace: the netlink socket, the sockstat files (sockstat6 is
    -1 without IPv6), the ephemeral port range."""
    files: list[int] = []
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_SOCK_DIAG)
    try:
        files.append(os.open("/proc/thread-self/net/sockstat", os.O_RDONLY | os.O_CLOEXEC))
        try:
            files.append(os.open("/proc/thread-self/net/sockstat6",
                                 os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            files.append(-1)
        port_range = read_port_range()
        sock.bind((0, 0))
        sock.setblocking(False)
        return _Handles(sock, files[0], files[1], port_range)
    except BaseException:
        sock.close()
        for fd in files:
            if fd >= 0:
                os.close(fd)
        raise


class VmTracker:
    """The listening sockets of one VM namespace (see the module's theory of operation).

    :meth:`open` once (it runs a short thread inside the namespace), then :meth:`poll`
    from the engine thread, :meth:`close` at the end.  The constructor does no I/O.
    ``track_connected`` (settable at any time): also keep ``connected_ports``.
    """

    def __init__(self, netns: str | None, namespaces: Namespaces, *,
                 full_interval: float = 2.0, track_connected: bool = False) -> None:
        self.netns = netns                  # None: this process's namespace
        self.namespaces = namespaces
        self.full_interval = full_interval
        self.track_connected = track_connected
        self.sockets: frozenset[DiagSocket] = frozenset()
        # TCP ports that lost their listener and still have connections: port -> count
        self.connected_ports: dict[int, int] = {}
        self.dumps = 0                      # dumps made so far (for tests and benchmarks)
        self._h: _Handles | None = None
        self._inode: tuple[int, int] | None = None
        self._counts: dict[str, int] | None = None
        self._gate: tuple[bytes, bytes] = (b"", b"")
        self._found: dict[Dump, frozenset[DiagSocket]] = {}
        self._lingering: dict[Dump, dict[int, int]] = {}
        self._unsupported: set[Dump] = set()
        self._next_full = 0.0
        self._seq = 0
        self._buf = bytearray(RECV_SIZE)

    @property
    def port_range(self) -> tuple[int, int]:
        return self._h.port_range if self._h is not None else DEFAULT_PORT_RANGE

    def open(self) -> None:
        """Open the handles inside the namespace; OSError if it does not exist."""
        if self._h is not None:
            return
        self._inode = self.namespaces.inode(self.netns)
        executor = self.namespaces.executor(self.netns)
        try:
            self._h = executor.call(_open_handles)
        finally:
            executor.close()
        if self._h.sockstat6 < 0:
            self._unsupported.update(d for d in DUMPS if d.family == socket.AF_INET6)

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            h.netlink.close()
            for fd in (h.sockstat, h.sockstat6):
                if fd >= 0:
                    os.close(fd)

    def replaced(self) -> bool:
        """True when the namespace's name is gone or names another namespace now."""
        try:
            return self.namespaces.inode(self.netns) != self._inode
        except OSError:
            return True

    def poll(self, now: float) -> bool:
        """Read the gate, dump what it says changed (everything when the periodic full
        dump is due); True when the set of listening sockets changed."""
        h = self._h
        if h is None:
            raise RuntimeError("the tracker is not open")
        data = os.pread(h.sockstat, 4096, 0)
        data6 = os.pread(h.sockstat6, 4096, 0) if h.sockstat6 >= 0 else b""
        gate = (gate_v4(data), data6)
        full = now >= self._next_full
        if gate == self._gate and not full:
            return False                    # the idle path: two preads and a comparison
        self._gate = gate       # read before the dumps: a change after them shows next time
        counts = parse_sockstat(data)
        counts.update(parse_sockstat(data6))
        if full:
            self._next_full = now + self.full_interval
            dumps: Iterable[Dump] = DUMPS
        else:   # equal in-use counts but other counters moved: a change may hide behind them
            dumps = dumps_for(self._counts, counts) or DUMPS
        self._counts = counts
        changed = False
        for dump in dumps:
            if dump in self._unsupported:
                continue
            before = self._found.get(dump, frozenset())
            found = listening(self._dump(h.netlink, dump, dump.states), h.port_range)
            if found != before:
                self._found[dump] = found
                changed = True
            if self.track_connected and dump.protocol == IPPROTO_TCP:
                changed |= self._linger(h.netlink, dump, before, found)
        if changed:
            self.sockets = frozenset().union(*self._found.values())
        return changed

    def _linger(self, sock: socket.socket, dump: Dump, before: frozenset[DiagSocket],
                after: frozenset[DiagSocket]) -> bool:
        """Update the ports of ``dump`` that lost their listener and still have
        connections; True when one came or went."""
        old = self._lingering.get(dump, {})
        listen = {s.port for s in after}
        watched = ({s.port for s in before} | old.keys()) - listen
        new = lingering(watched, self._dump(sock, dump, CONNECTED_MASK)) if watched else {}
        if new == old:
            return False
        self._lingering[dump] = new
        merged: dict[int, int] = {}
        for ports in self._lingering.values():
            for port, count in ports.items():
                merged[port] = merged.get(port, 0) + count
        self.connected_ports = merged
        return new.keys() != old.keys()

    def _dump(self, sock: socket.socket, dump: Dump, states: int) -> list[DiagSocket]:
        self._seq = self._seq % 0x7FFFFFFF + 1
        self.dumps += 1
        sock.send(build_request(dump.family, dump.protocol, states, self._seq))
        view = memoryview(self._buf)
        result: list[DiagSocket] = []
        while True:
            # The kernel fills each part of a dump during send() and recv() themselves, so
            # the non-blocking socket never has to wait; a stray EAGAIN is an error.
            n = sock.recv_into(self._buf)
            try:
                found, done = parse_messages(view[:n], dump.protocol, self._seq)
            except DiagError as exc:
                if exc.errno not in (errno.ENOENT, errno.EOPNOTSUPP, errno.EAFNOSUPPORT):
                    raise
                self._unsupported.add(dump)   # no udp_diag (or no IPv6) in this kernel
                log.warning("%s: cannot list %s sockets: %s", self.netns, dump.counter,
                            exc.strerror)
                return []
            result.extend(found)
            if done:
                return result
