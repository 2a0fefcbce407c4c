"""portproxy.dnsstate: the pending table driven by hand, with a fake clock and ids."""

from __future__ import annotations

import ipaddress
import itertools
import struct
from collections.abc import Iterator

import pytest

from portproxy import dnsmsg
from portproxy.dnsmsg import Header, Rcode
from portproxy.dnsstate import (
    ClientFilter,
    Close,
    Forwarding,
    Reply,
    SendTcp,
    SendUdp,
    Upstream,
    source_key,
    upstreams_from_resolv,
)

A, IN = 1, 1
UP1 = Upstream("192.0.2.1")
UP2 = Upstream("192.0.2.2")
UP3 = Upstream("2001:db8::3")


def query_bytes(id: int = 0x1111, qname: bytes = b"\x07example\x04test\x00") -> bytes:
    return struct.pack("!6H", id, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", A, IN)


def answer(query: bytes, id: int, rcode: int = 0, tc: bool = False) -> bytes:
    flags = 0x8180 | rcode | (0x0200 if tc else 0)
    rr = b"\xc0\x0c" + struct.pack("!HHIH", A, IN, 60, 4) + bytes([198, 51, 100, 80])
    return struct.pack("!6H", id, flags, 1, 1, 0, 0) + query[12:] + rr


class Ids:
    """Predictable 'random' ids, with repeats on demand."""

    def __init__(self, values: list[int] | None = None) -> None:
        self.values: Iterator[int] = iter(values) if values else itertools.count(100)

    def __call__(self, bits: int) -> int:
        assert bits == 16
        return next(self.values)


def forwarding(*upstreams: Upstream, **kw: object) -> Forwarding:
    fw = Forwarding(randbits=Ids(kw.pop("ids", None)), **kw)  # type: ignore[arg-type]
    fw.upstreams = upstreams
    return fw


def ask(fw: Forwarding, client: object = "c1", data: bytes | None = None, now: float = 0.0,
        tcp: bool = False) -> tuple[bytes, list[object]]:
    data = data or query_bytes()
    return data, list(fw.query(client, dnsmsg.parse_query(data), data, now, tcp=tcp))


def test_query_goes_to_the_first_upstream_with_a_fresh_id() -> None:
    fw = forwarding(UP1, UP2)
    data, actions = ask(fw)
    assert actions == [SendUdp(100, UP1, dnsmsg.with_id(data, 100))]
    assert len(fw) == 1 and fw.next_deadline() == 1.5


def test_answer_goes_back_with_the_client_id_and_the_try_is_closed() -> None:
    fw = forwarding(UP1)
    data, _ = ask(fw)
    out = fw.answer(100, answer(data, 100), UP1.key, 0.1)
    assert out == [Close(100), Reply("c1", answer(data, 0x1111), False)]
    assert len(fw) == 0 and fw.dropped == 0


def test_ids_are_unique_within_the_table() -> None:
    fw = forwarding(UP1, ids=[7, 7, 7, 8])
    ask(fw, "a")
    _, actions = ask(fw, "b")
    assert [a.key for a in actions if isinstance(a, SendUdp)] == [8]


def test_ids_come_from_the_system_random_source_by_default() -> None:
    fw = Forwarding()
    fw.upstreams = (UP1,)
    data = query_bytes()
    keys = set()
    for i in range(64):
        (send,) = fw.query(f"c{i}", dnsmsg.parse_query(data), data, 0.0)
        assert isinstance(send, SendUdp) and send.data[2:] == data[2:]
        keys.add(send.key)
    assert len(keys) == 64                       # unique within the table
    assert any(key >= 256 for key in keys)       # all 16 bits, not a counter


@pytest.mark.parametrize("source", [UP2.key, ("192.0.2.1", 5353)])
def test_answer_from_another_address_or_port_is_dropped(source: tuple[str, int]) -> None:
    fw = forwarding(UP1, UP2)
    data, _ = ask(fw)
    assert fw.answer(100, answer(data, 100), source, 0.1) == []
    assert fw.dropped == 1 and len(fw) == 1 and "192.0.2.1:53" in fw.last_drop
    assert fw.answer(100, answer(data, 100), UP1.key, 0.2)[-1] == Reply(
        "c1", answer(data, 0x1111), False)


def test_answer_on_another_try_s_socket_is_dropped() -> None:
    fw = forwarding(UP1)
    a, _ = ask(fw, "a")
    ask(fw, "b", data=query_bytes(0x2222, b"\x05other\x04test\x00"))
    assert fw.answer(101, answer(a, 100), UP1.key, 0.1) == []      # a's answer, b's socket
    assert fw.answer(555, answer(a, 100), UP1.key, 0.1) == []      # no such try
    assert fw.dropped == 2 and len(fw) == 2
    assert fw.answer(100, answer(a, 100), UP1.key, 0.2)[-1] == Reply(
        "a", answer(a, 0x1111), False)


@pytest.mark.parametrize("garbage", [
    b"", b"\x00", b"junk" * 10,
    answer(query_bytes(), 101),                                      # another id
    answer(query_bytes(qname=b"\x05other\x04test\x00"), 100),        # another question
    answer(query_bytes(qname=b"\x07example\x04tes\x00"), 100),       # a shorter one
    query_bytes(id=100),                                             # QR clear
])
def test_garbage_is_dropped_and_the_query_stays(garbage: bytes) -> None:
    fw = forwarding(UP1)
    data, _ = ask(fw)
    assert fw.answer(100, garbage, UP1.key, 0.1) == []
    assert fw.dropped == 1 and fw.last_drop
    assert fw.answer(100, answer(data, 100), UP1.key, 0.2)[-1] == Reply(
        "c1", answer(data, 0x1111), False)


def test_another_question_type_or_class_is_dropped() -> None:
    fw = forwarding(UP1)
    data, _ = ask(fw)
    aaaa = data[:-4] + struct.pack("!HH", 28, IN)
    chaos = data[:-4] + struct.pack("!HH", A, 3)
    assert fw.answer(100, answer(aaaa, 100), UP1.key, 0.1) == []
    assert fw.answer(100, answer(chaos, 100), UP1.key, 0.1) == []
    assert fw.dropped == 2 and len(fw) == 1


def test_the_question_is_compared_without_regard_to_case() -> None:
    fw = forwarding(UP1)
    ask(fw)
    shouted = answer(query_bytes(qname=b"\x07ExAmPlE\x04TEST\x00"), 100)
    (close, reply) = fw.answer(100, shouted, UP1.key, 0.1)
    assert close == Close(100) and reply == Reply("c1", dnsmsg.with_id(shouted, 0x1111), False)


def test_timeout_moves_on_then_servfail() -> None:
    fw = forwarding(UP1, UP2)
    data, _ = ask(fw)
    assert fw.expire(1.0) == []
    moved = fw.expire(1.5)
    assert moved == [Close(100), SendUdp(101, UP2, dnsmsg.with_id(data, 101))]
    assert fw.next_deadline() == 3.0
    assert fw.answer(100, answer(data, 100), UP1.key, 1.6) == []            # late: old try
    (close, reply) = fw.expire(3.0)
    assert close == Close(101)
    assert isinstance(reply, Reply) and reply.failed and reply.client == "c1"
    header = Header.parse(reply.data)
    assert header.id == 0x1111 and header.rcode == Rcode.SERVFAIL and len(fw) == 0


def test_expiry_pops_in_deadline_order() -> None:
    fw = forwarding(UP1)
    ask(fw, "a", now=0.0)
    ask(fw, "b", now=1.0)
    first = fw.expire(1.5)
    assert [r.client for r in first if isinstance(r, Reply)] == ["a"]
    assert fw.next_deadline() == 2.5
    assert [r.client for r in fw.expire(9.0) if isinstance(r, Reply)] == ["b"]


def test_unreachable_upstream_moves_on_at_once() -> None:
    fw = forwarding(UP1, UP2)
    data, _ = ask(fw)
    assert fw.failed(100, UP2.key, 0.1) == []                          # not that upstream
    assert fw.failed(100, UP1.key, 0.1) == [Close(100),
                                            SendUdp(101, UP2, dnsmsg.with_id(data, 101))]
    assert fw.failed(999, None, 0.1) == []


def test_the_upstream_that_answered_goes_first_next_time() -> None:
    fw = forwarding(UP1, UP2, UP3)
    data, _ = ask(fw)
    fw.expire(1.5)                                                    # UP1 silent
    fw.answer(101, answer(data, 101), UP2.key, 1.6)
    _, actions = ask(fw, "c2", now=2.0)
    assert [a.upstream for a in actions if isinstance(a, SendUdp)] == [UP2]
    (_, moved) = fw.expire(3.5)
    assert isinstance(moved, SendUdp) and moved.upstream == UP3        # then the rest, in turn


@pytest.mark.parametrize("rcode", [Rcode.SERVFAIL, Rcode.REFUSED])
def test_servfail_or_refused_tries_the_next_then_passes_the_last_on(rcode: Rcode) -> None:
    fw = forwarding(UP1, UP2)
    data, _ = ask(fw)
    assert fw.answer(100, answer(data, 100, rcode), UP1.key, 0.1) == [
        Close(100), SendUdp(101, UP2, dnsmsg.with_id(data, 101))]
    assert fw.expire(9.0) == [Close(101), Reply("c1", answer(data, 0x1111, rcode), False)]


def test_nxdomain_is_an_answer() -> None:
    fw = forwarding(UP1, UP2)
    data, _ = ask(fw)
    (_, reply) = fw.answer(100, answer(data, 100, Rcode.NXDOMAIN), UP1.key, 0.1)
    assert isinstance(reply, Reply) and Header.parse(reply.data).rcode == Rcode.NXDOMAIN


def test_no_upstream_or_a_full_table_is_servfail_at_once() -> None:
    fw = forwarding()
    _, (reply,) = ask(fw)
    assert isinstance(reply, Reply) and reply.failed
    full = forwarding(UP1, max_pending=2)
    ask(full, "a")
    ask(full, "b")
    _, (reply,) = ask(full, "c")
    assert isinstance(reply, Reply) and reply.failed and reply.client == "c"
    assert len(full) == 2


def test_truncated_answer_is_passed_on_to_a_udp_client() -> None:
    fw = forwarding(UP1)
    data, _ = ask(fw)
    (_, reply) = fw.answer(100, answer(data, 100, tc=True), UP1.key, 0.1)
    assert isinstance(reply, Reply) and Header.parse(reply.data).tc


def test_truncated_answer_to_a_tcp_client_is_asked_again_over_tcp() -> None:
    fw = forwarding(UP1, UP2)
    data, _ = ask(fw, tcp=True)
    assert fw.answer(100, answer(data, 100, tc=True), UP1.key, 0.1) == [
        Close(100), SendTcp(101, UP1, dnsmsg.with_id(data, 101))]
    assert fw.answer(101, answer(data, 101), UP1.key, 0.2) == []             # not over UDP
    assert fw.tcp_answer(101, answer(data, 101), 0.3) == [
        Close(101), Reply("c1", answer(data, 0x1111), False)]


def test_failed_tcp_try_is_closed_and_moves_on() -> None:
    fw = forwarding(UP1, UP2)
    data, _ = ask(fw, tcp=True)
    fw.answer(100, answer(data, 100, tc=True), UP1.key, 0.1)
    assert fw.expire(1.6) == [Close(101), SendUdp(102, UP2, dnsmsg.with_id(data, 102))]
    fw.answer(102, answer(data, 102, tc=True), UP2.key, 1.7)
    assert fw.tcp_answer(103, b"junk", 1.8)[:1] == [Close(103)]
    assert fw.dropped == 1 and len(fw) == 0


def test_client_filter_lets_in_the_network_s_vms_only() -> None:
    f = ClientFilter.network(ipaddress.ip_network("172.16.0.0/20"), "172.16.0.1", ifindex=7)
    assert f.allows("172.16.0.2", 7) is None
    assert f.allows("172.16.15.254", None) is None              # TCP: the kernel checked
    assert "interface 3" in str(f.allows("172.16.0.2", 3))       # another interface
    assert f.allows("172.16.0.2", 0) is not None                # arrival unknown: refused
    for outsider in ("198.51.100.1", "172.16.16.1", "10.0.0.1", "::1", "::ffff:172.16.0.2"):
        assert f.allows(outsider, 7) is not None, outsider
    for own in ("172.16.0.1", "172.16.0.0", "172.16.15.255"):    # the host, net, broadcast
        assert f.allows(own, 7) is not None, own
    assert f.allows("not-an-address", 7) is not None
    anyone = ClientFilter()
    assert anyone.allows("198.51.100.1", 3) is None


def test_upstreams_from_resolv() -> None:
    text = ("nameserver 127.0.0.53\nnameserver 2001:DB8::1\nnameserver fe80::1%eth0\n"
            "nameserver bogus\nnameserver 127.0.0.53\nnameserver 10.0.0.1\n"
            "nameserver 10.0.0.2\n# nameserver 10.0.0.3\nsearch x\n")
    assert upstreams_from_resolv(text) == (
        Upstream("127.0.0.53"), Upstream("2001:db8::1"), Upstream("fe80::1", 53, "eth0"))
    assert upstreams_from_resolv(text, exclude=[("127.0.0.53", 53)], limit=2) == (
        Upstream("2001:db8::1"), Upstream("fe80::1", 53, "eth0"))
    assert str(Upstream("fe80::1", 53, "eth0")) == "[fe80::1%eth0]:53"
    assert str(UP1) == "192.0.2.1:53"


def test_source_key() -> None:
    assert source_key(("192.0.2.1", 53)) == UP1.key
    assert source_key(("fe80::1%eth0", 53, 0, 2)) == ("fe80::1", 53)
