"""portproxy.tracker, the pure half: sock_diag requests and answers as crafted bytes,
the sockstat gate, the ephemeral-port rule.  No root, no kernel."""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import pytest

from portproxy.namespaces import Executor
from portproxy.tracker import (
    CONNECTED_STATES,
    DUMPS,
    INET_DIAG_SKV6ONLY,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    DiagError,
    DiagSocket,
    Dump,
    VmTracker,
    _Handles,
    build_request,
    dumps_for,
    gate_v4,
    is_listening,
    lingering,
    listening,
    parse_messages,
    parse_port_range,
    parse_sockstat,
    read_port_range,
)

TCP, UDP = 6, 17
INET_DIAG_SHUTDOWN = 8


def nlmsg(kind: int, body: bytes, seq: int = 7, flags: int = 2) -> bytes:
    """One netlink message, padded to 4 bytes as the kernel sends it."""
    header = struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 4242)
    return header + body + bytes(-len(body) % 4)


def rtattr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def diag_msg(family: int, state: int, address: str, port: int, dport: int = 0,
             inode: int = 99, attrs: bytes = b"") -> bytes:
    """A struct inet_diag_msg (72 bytes) followed by its attributes."""
    packed = socket.inet_pton(family, address).ljust(16, b"\0")
    return (struct.pack("=BBBB", family, state, 0, 0) + struct.pack(">HH", port, dport)
            + packed + bytes(16) + struct.pack("=I", 0) + bytes(8)
            + struct.pack("=IIIII", 0, 0, 0, 0, inode) + attrs)


def done(seq: int = 7) -> bytes:
    return nlmsg(NLMSG_DONE, struct.pack("=i", 0), seq)


# requests


def test_request_is_a_sock_diag_dump_of_one_family_and_protocol() -> None:
    data = build_request(socket.AF_INET6, TCP, 1 << TCP_LISTEN, seq=3)
    assert len(data) == 16 + 56                          # nlmsghdr + inet_diag_req_v2
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", data)
    assert (length, kind, seq, pid) == (72, SOCK_DIAG_BY_FAMILY, 3, 0)
    assert flags == 0x301                                # NLM_F_REQUEST | NLM_F_DUMP
    family, protocol, ext, pad, states = struct.unpack_from("=BBBBI", data, 16)
    assert (family, protocol, ext, pad, states) == (socket.AF_INET6, TCP, 0, 0, 1 << 10)
    assert data[24:] == bytes(48)                        # inet_diag_sockid: match all


def test_the_four_dumps_ask_for_listeners_and_unconnected_udp() -> None:
    asked = {(d.family, d.protocol, d.states, d.counter) for d in DUMPS}
    assert asked == {(socket.AF_INET, TCP, 1 << TCP_LISTEN, "TCP"),
                     (socket.AF_INET6, TCP, 1 << TCP_LISTEN, "TCP6"),
                     (socket.AF_INET, UDP, 1 << TCP_CLOSE, "UDP"),
                     (socket.AF_INET6, UDP, 1 << TCP_CLOSE, "UDP6")}


# answers


def test_parses_a_v4_listener_and_the_end_of_the_dump() -> None:
    data = nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(socket.AF_INET, TCP_LISTEN, "127.0.0.1", 8080,
                                               inode=5)) + done()
    sockets, finished = parse_messages(data, TCP, seq=7)
    assert finished
    assert sockets == [DiagSocket("tcp", socket.AF_INET, "127.0.0.1", 8080, TCP_LISTEN, 0,
                                  False, 5)]


@pytest.mark.parametrize("v6only", [False, True])
def test_parses_the_v6only_attribute(v6only: bool) -> None:
    attrs = (rtattr(INET_DIAG_SHUTDOWN, b"\0")
             + rtattr(INET_DIAG_SKV6ONLY, bytes([int(v6only)])))
    data = nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(socket.AF_INET6, TCP_LISTEN, "::", 443,
                                               attrs=attrs))
    sockets, finished = parse_messages(data, TCP, seq=7)
    assert not finished                                  # more may come in the next recv
    assert [(s.address, s.port, s.v6only) for s in sockets] == [("::", 443, v6only)]


def test_parses_udp_ports_and_skips_other_sequence_numbers() -> None:
    data = (nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(socket.AF_INET, TCP_CLOSE, "0.0.0.0", 53))
            + nlmsg(SOCK_DIAG_BY_FAMILY,
                    diag_msg(socket.AF_INET, TCP_CLOSE, "1.2.3.4", 1), seq=6)
            + nlmsg(SOCK_DIAG_BY_FAMILY,
                    diag_msg(socket.AF_INET, TCP_ESTABLISHED, "10.0.0.2", 40000, dport=53))
            + done(seq=6))
    sockets, finished = parse_messages(data, UDP, seq=7)
    assert not finished                                  # that DONE was another dump's
    assert [(s.protocol, s.address, s.port, s.dport) for s in sockets] == [
        ("udp", "0.0.0.0", 53, 0), ("udp", "10.0.0.2", 40000, 53)]


def test_an_error_answer_raises_with_its_errno() -> None:
    request = build_request(socket.AF_INET, UDP, 1 << TCP_CLOSE, seq=7)
    data = nlmsg(NLMSG_ERROR, struct.pack("=i", -errno.ENOENT) + request[:16])
    with pytest.raises(DiagError) as info:
        parse_messages(data, UDP, seq=7)
    assert info.value.errno == errno.ENOENT


def test_an_acknowledgement_ends_the_dump() -> None:
    data = nlmsg(NLMSG_ERROR, struct.pack("=i", 0) + bytes(16))
    assert parse_messages(data, TCP, seq=7) == ([], True)


def test_truncated_messages_are_refused() -> None:
    data = nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(socket.AF_INET, TCP_LISTEN, "0.0.0.0", 80))
    with pytest.raises(ValueError, match="truncated netlink message"):
        parse_messages(data[:60], TCP)                   # the header claims more
    short = struct.pack("=I", 60) + data[4:60]           # a header true to a short body
    with pytest.raises(ValueError, match="truncated inet_diag_msg"):
        parse_messages(short, TCP)


def test_parses_a_memoryview_of_a_receive_buffer() -> None:
    buf = bytearray(4096)
    data = nlmsg(SOCK_DIAG_BY_FAMILY, diag_msg(socket.AF_INET6, TCP_CLOSE, "::1", 5353)) + done()
    buf[:len(data)] = data
    sockets, finished = parse_messages(memoryview(buf)[:len(data)], UDP, seq=7)
    assert finished and [s.address for s in sockets] == ["::1"]


# the gate


SOCKSTAT = b"""sockets: used 12
TCP: inuse 3 orphan 0 tw 4 alloc 15 mem 1427
UDP: inuse 1 mem 2
UDPLITE: inuse 0
RAW: inuse 0
FRAG: inuse 0 memory 0
"""
SOCKSTAT6 = b"""TCP6: inuse 2
UDP6: inuse 0
UDPLITE6: inuse 0
RAW6: inuse 0
FRAG6: inuse 0 memory 0
"""


def test_sockstat_gives_the_in_use_counters_only() -> None:
    assert parse_sockstat(SOCKSTAT) == {"TCP": 3, "UDP": 1}
    assert parse_sockstat(SOCKSTAT6) == {"TCP6": 2, "UDP6": 0}
    # time-wait, allocation and memory figures change all the time: they are not the gate
    assert parse_sockstat(SOCKSTAT.replace(b"tw 4", b"tw 9").replace(b"mem 2", b"mem 7")) \
        == parse_sockstat(SOCKSTAT)


def test_the_v4_gate_holds_the_counters_of_the_namespace() -> None:
    assert gate_v4(SOCKSTAT) == b"12/3/4/1"              # used, TCP inuse, tw, UDP inuse
    machine = (SOCKSTAT.replace(b"orphan 0", b"orphan 5").replace(b"alloc 15", b"alloc 300")
               .replace(b"mem 1427", b"mem 9").replace(b"mem 2", b"mem 70"))
    assert gate_v4(machine) == gate_v4(SOCKSTAT)        # machine-wide: not the gate
    assert gate_v4(SOCKSTAT.replace(b"TCP: inuse 3", b"TCP: inuse 13")) == b"12/13/4/1"
    assert gate_v4(SOCKSTAT.replace(b"UDP: inuse 1", b"UDP: inuse 0")) == b"12/3/4/0"
    assert gate_v4(SOCKSTAT.replace(b"used 12", b"used 11").replace(b"tw 4", b"tw 5")) \
        == b"11/3/5/1"


def test_only_the_dumps_whose_counter_changed() -> None:
    old = {"TCP": 3, "UDP": 1, "TCP6": 2, "UDP6": 0}
    assert dumps_for(None, old) == list(DUMPS)
    assert dumps_for(old, dict(old)) == []
    assert [d.counter for d in dumps_for(old, {**old, "TCP": 4})] == ["TCP"]
    assert [d.counter for d in dumps_for(old, {**old, "UDP6": 1, "TCP6": 1})] == ["TCP6", "UDP6"]


@pytest.mark.parametrize(("text", "expected"), [("32768\t60999\n", (32768, 60999)),
                                                ("1024 1024", (1024, 1024))])
def test_port_range(text: str, expected: tuple[int, int]) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["", "32768", "a b", "60999 32768", "0 10", "1 65536"])
def test_bad_port_range(text: str) -> None:
    with pytest.raises(ValueError):
        parse_port_range(text)


# which sockets are servers


def udp(port: int, dport: int = 0, state: int = TCP_CLOSE) -> DiagSocket:
    return DiagSocket("udp", socket.AF_INET, "0.0.0.0", port, state, dport)


@pytest.mark.parametrize(("sock", "expected"), [
    (DiagSocket("tcp", socket.AF_INET, "0.0.0.0", 80, TCP_LISTEN), True),
    (DiagSocket("tcp", socket.AF_INET, "0.0.0.0", 45000, TCP_LISTEN), True),  # listen, no bind
    (DiagSocket("tcp", socket.AF_INET, "10.0.0.2", 45000, TCP_ESTABLISHED, 80), False),
    (udp(53), True),
    (udp(32767), True),
    (udp(32768), False),          # a client's sendto() without bind(): ephemeral
    (udp(60999), False),
    (udp(61000), True),
    (udp(53, dport=53), False),   # connected: outgoing traffic
    (udp(5353, state=TCP_ESTABLISHED), False),
    (udp(0), False),
], ids=["tcp-80", "tcp-ephemeral", "tcp-established", "udp-53", "udp-below-range",
        "udp-range-low", "udp-range-high", "udp-above-range", "udp-connected",
        "udp-established", "udp-port-0"])
def test_is_listening(sock: DiagSocket, expected: bool) -> None:
    assert is_listening(sock, (32768, 60999)) is expected


def test_the_ephemeral_range_is_the_vms() -> None:
    assert is_listening(udp(40000), (50000, 50100))
    assert listening([udp(40000), udp(50050)], (50000, 50100)) == frozenset({udp(40000)})


def test_the_port_range_of_a_file_or_the_default(tmp_path: Path) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text("40000\t40009\n")
    assert read_port_range(str(path)) == (40000, 40009)
    path.write_text("garbage")
    assert read_port_range(str(path)) == (32768, 60999)
    assert read_port_range(str(tmp_path / "missing")) == (32768, 60999)


# connections that outlive their listener (mirrored mode)

TCP_SYN_SENT, TCP_TIME_WAIT, TCP_NEW_SYN_RECV = 2, 6, 12


def tcp_sock(port: int, state: int, dport: int = 0, address: str = "0.0.0.0") -> DiagSocket:
    return DiagSocket("tcp", socket.AF_INET, address, port, state, dport)


def test_connected_states_are_live_connections_only() -> None:
    assert TCP_ESTABLISHED in CONNECTED_STATES
    for state in (TCP_LISTEN, TCP_CLOSE, TCP_TIME_WAIT, TCP_SYN_SENT, TCP_NEW_SYN_RECV):
        assert state not in CONNECTED_STATES


def test_lingering_counts_connections_by_local_port() -> None:
    sockets = [tcp_sock(8080, TCP_ESTABLISHED, 50000), tcp_sock(8080, 8, 50001),  # CLOSE_WAIT
               tcp_sock(50002, TCP_ESTABLISHED, 8080),   # the daemon's dial: remote 8080
               tcp_sock(8080, TCP_TIME_WAIT, 50003), tcp_sock(9090, TCP_ESTABLISHED, 1),
               DiagSocket("udp", socket.AF_INET, "0.0.0.0", 8080, TCP_ESTABLISHED, 53)]
    assert lingering([8080, 7070], sockets) == {8080: 2}


class _FakeKernel:
    """What the dumps of a tracker answer: listeners and connections per family."""

    def __init__(self) -> None:
        self.sockets: dict[int, list[DiagSocket]] = {socket.AF_INET: [], socket.AF_INET6: []}
        self.asked: list[tuple[int, int, int]] = []

    def dump(self, sock: object, dump: Dump, states: int) -> list[DiagSocket]:
        self.asked.append((dump.family, dump.protocol, states))
        if dump.protocol != TCP:
            return []
        return [s for s in self.sockets[dump.family] if states & (1 << s.state)]


class _NotOpened:
    """The trackers here get their handles made by hand: no namespace is entered."""

    def executor(self, netns: str | None) -> Executor:
        raise AssertionError("the tracker must not open a namespace here")

    def inode(self, netns: str | None) -> tuple[int, int]:
        raise AssertionError("the tracker must not look at a namespace here")


def tracker_with(kernel: _FakeKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 track: bool) -> VmTracker:
    path = tmp_path / "sockstat"
    path.write_bytes(SOCKSTAT)
    fd = os.open(path, os.O_RDONLY)
    tracker = VmTracker("vm", _NotOpened(), full_interval=0.0,  # every poll: full
                        track_connected=track)
    tracker._h = _Handles(socket.socket(socket.AF_UNIX), fd, -1, (32768, 60999))
    monkeypatch.setattr(tracker, "_dump", kernel.dump)
    return tracker


def test_a_port_is_kept_while_a_connection_lives(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _FakeKernel()
    tracker = tracker_with(kernel, tmp_path, monkeypatch, track=True)
    try:
        v4 = kernel.sockets[socket.AF_INET]
        v4[:] = [tcp_sock(8080, TCP_LISTEN), tcp_sock(8080, TCP_ESTABLISHED, 50000)]
        assert tracker.poll(1.0) and tracker.connected_ports == {}
        v4[:] = [tcp_sock(8080, TCP_ESTABLISHED, 50000), tcp_sock(8080, 4, 50001)]
        assert tracker.poll(2.0)                     # the listener went: a port lingers
        assert tracker.sockets == frozenset() and tracker.connected_ports == {8080: 2}
        v4.pop()
        assert not tracker.poll(3.0)                 # fewer connections: not a change
        assert tracker.connected_ports == {8080: 1}
        v4[:] = [tcp_sock(8080, TCP_TIME_WAIT, 50000)]
        assert tracker.poll(4.0) and tracker.connected_ports == {}
        kernel.asked.clear()
        assert not tracker.poll(5.0)
        assert all(states == 1 << TCP_LISTEN for _f, p, states in kernel.asked if p == TCP)
    finally:
        tracker.close()


def test_without_tracking_only_listeners_are_dumped(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _FakeKernel()
    tracker = tracker_with(kernel, tmp_path, monkeypatch, track=False)
    try:
        kernel.sockets[socket.AF_INET6] = [tcp_sock(8080, TCP_LISTEN, address="::")]
        assert tracker.poll(1.0)
        kernel.sockets[socket.AF_INET6] = [tcp_sock(8080, TCP_ESTABLISHED, 1, "::")]
        assert tracker.poll(2.0) and tracker.connected_ports == {}
        assert {states for _f, p, states in kernel.asked if p == TCP} == {1 << TCP_LISTEN}
    finally:
        tracker.close()
