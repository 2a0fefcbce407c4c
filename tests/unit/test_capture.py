"""hns.capture without the kernel: the checks of a request (nothing created when one
fails), names resolved to interfaces, the line per packet on frames built in memory,
the progress and final lines, the read loop on a socket pair, and the pcap file."""

from __future__ import annotations

import argparse
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NS, IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from hns import capture
from hns.capture import (
    check_filter,
    check_output,
    parse_count,
    parse_duration,
    parse_request,
    recorder_for,
    resolve_target,
)
from hns.capture_format import (
    Progress,
    Totals,
    describe,
    final_line,
    format_time,
    packet_line,
    progress_text,
    summary_json,
)
from hns.capture_io import PcapSink, Pump, Recorder, Waker
from hns.errors import Conflict, InvalidRequest, NotFound
from hns.fake_kernel import FakeKernel
from hns.service import Service
from nat.nft import FakeNft

# the checks of a request


@pytest.mark.parametrize("text", ["1", "6", " 42 ", str(2**40)])
def test_a_count_is_a_whole_number_of_one_or_more(text: str) -> None:
    assert parse_count(text) == int(text)


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "ten", "", "0x10", "1e3"])
def test_a_bad_count_is_an_invalid_request(text: str) -> None:
    with pytest.raises(InvalidRequest, match="--count") as info:
        parse_count(text)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("text", ["0.5", "3", " 10 ", "1e-3"])
def test_a_duration_is_a_positive_number_of_seconds(text: str) -> None:
    assert parse_duration(text) == float(text)


@pytest.mark.parametrize("text", ["0", "-2", "nan", "inf", "soon", ""])
def test_a_bad_duration_is_an_invalid_request(text: str) -> None:
    with pytest.raises(InvalidRequest, match="--duration"):
        parse_duration(text)


def test_no_count_or_duration_means_none() -> None:
    assert parse_count(None) is None
    assert parse_duration(None) is None


@pytest.mark.parametrize("bpf", ["icmp", "udp port 53", "host 10.0.0.1 and not arp",
                                 "ether proto 0x88cc"])
def test_a_filter_libpcap_compiles_is_kept(bpf: str) -> None:
    assert check_filter(bpf) == bpf


def test_a_blank_filter_is_no_filter() -> None:
    assert check_filter(None) is None
    assert check_filter("  ") is None


@pytest.mark.parametrize("bpf", ["tcp port", "not a filter (((", "port 99999", "hots 1.2.3.4"])
def test_a_filter_libpcap_refuses_is_one_line_naming_it(bpf: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_filter(bpf)
    message = str(info.value)
    assert message.startswith(f"bad filter {bpf!r}: ") and len(message) > len(bpf) + 16
    assert "\n" not in message


def test_an_output_needs_an_existing_writable_directory(tmp_path: Path) -> None:
    check_output(str(tmp_path / "a.pcap"))
    check_output(None)
    for bad, why in ((tmp_path / "no" / "a.pcap", "does not exist"), (tmp_path, "directory"),
                     (Path(f"{tmp_path}/"), "directory")):
        with pytest.raises(InvalidRequest, match=why):
            check_output(str(bad))
    assert os.listdir(tmp_path) == []


def test_a_request_with_a_bad_part_creates_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "out.pcap")
    for count, duration, words in (("0", None, []), (None, "-1", []),
                                   (None, None, ["udp", "port"])):
        with pytest.raises(InvalidRequest):
            parse_request("v", path, count, duration, words)
    assert os.listdir(tmp_path) == []
    req = parse_request("v", path, "3", "1.5", ["udp", "port", "53"])
    assert (req.count, req.duration, req.bpf, req.path) == (3, 1.5, "udp port 53", path)
    assert os.listdir(tmp_path) == []


# names resolved to interfaces


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    with Service(tmp_path / "state", nft=FakeNft(), kernel=FakeKernel()) as service:
        service.create_network("n", "nat", subnet="10.50.0.0/24")
        service.create_vm("v", "n")
        yield service


def test_a_vm_captures_on_its_host_veth_a_network_on_its_bridge(svc: Service) -> None:
    vm, net = svc.get_vm("v"), svc.get_network("n")
    assert resolve_target(svc, "v") == capture.Target("vm", "v", vm.host_ifname)
    assert resolve_target(svc, "n") == capture.Target("network", "n", net.bridge)


def test_a_name_is_a_vm_before_it_is_a_network(svc: Service) -> None:
    svc.create_vm("n", "n")
    assert resolve_target(svc, "n").ifname == svc.get_vm("n").host_ifname


def test_an_unknown_name_is_not_found_and_a_stopped_vm_a_conflict(svc: Service) -> None:
    with pytest.raises(NotFound, match="no vm or network named 'w'"):
        resolve_target(svc, "w")
    svc.stop_vm("v")
    with pytest.raises(Conflict, match="stopped"):
        resolve_target(svc, "v")


def test_a_recorder_is_made_without_io_and_stops_unstarted(svc: Service, tmp_path: Path
                                                           ) -> None:
    rec = recorder_for(svc, "n", str(tmp_path / "r.pcap"), "icmp")
    assert (rec.ifname, rec.host_netns, rec.bpf) == (svc.get_network("n").bridge, None, "icmp")
    assert rec.stop() == 0 and rec.stop() == 0
    assert os.listdir(tmp_path) == ["state"]


def test_the_command_checks_everything_before_listening(svc: Service, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: object) -> None:
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(capture, "open_listener", no_socket)
    path = str(tmp_path / "x.pcap")
    for what, words in (("v", ["tcp", "port"]), ("nobody", ["icmp"])):
        args = argparse.Namespace(what=what, write=path, count=None, duration=None,
                                  filter=words, json=False)
        with pytest.raises(InvalidRequest):
            capture.capture_cmd(svc, args)
    assert not os.path.exists(path)


# the line per packet


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_times_are_tcpdumps_local_clock_to_the_microsecond(utc: None) -> None:
    assert format_time(3661.25) == "01:01:01.250000"
    assert format_time(59.9999996) == "00:01:00.000000"


def frame(pkt: Any) -> bytes:
    return bytes(Ether(src="00:15:5d:00:00:02", dst="00:15:5d:00:00:01") / pkt)


@pytest.mark.parametrize(("pkt", "text"), [
    (IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=8, id=7, seq=3),
     "ICMP 10.0.0.2 > 10.0.0.1 echo-request id 7 seq 3"),
    (IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=3, code=3),
     "ICMP 10.0.0.1 > 10.0.0.2 dest-unreach port-unreachable"),
    (IP(src="10.0.0.2", dst="198.51.100.1") / UDP(sport=40000, dport=9999) / b"m",
     "UDP 10.0.0.2:40000 > 198.51.100.1:9999"),
    (IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=5000, dport=80, flags="SA"),
     "TCP 10.0.0.2:5000 > 10.0.0.1:80 [SA]"),
    (IP(src="10.0.0.2", dst="10.0.0.1", proto=47), "IP 10.0.0.2 > 10.0.0.1 proto 47"),
    (IP(src="10.0.0.2", dst="10.0.0.1", frag=100, proto=17) / (b"x" * 8),
     "IP 10.0.0.2 > 10.0.0.1 fragment offset 800"),
    (IPv6(src="fd00::2", dst="fd00::1") / UDP(sport=53, dport=5353),
     "UDP [fd00::2]:53 > [fd00::1]:5353"),
    (IPv6(src="fe80::1", dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt="fe80::2"),
     "ICMP6 fe80::1 > ff02::1:ff00:2 Neighbor Discovery - Neighbor Solicitation"),
    (IPv6(src="fe80::1", dst="fe80::2") / IPv6ExtHdrHopByHop() / ICMPv6EchoRequest(),
     "ICMP6 fe80::1 > fe80::2 Echo Request"),
    (ARP(op=1, psrc="10.0.0.2", pdst="10.0.0.1"), "ARP who-has 10.0.0.1 tell 10.0.0.2"),
    (ARP(op=2, psrc="10.0.0.1", hwsrc="00:15:5d:00:00:01"),
     "ARP 10.0.0.1 is-at 00:15:5d:00:00:01"),
])
def test_a_frame_is_described_by_its_layers(pkt: Any, text: str) -> None:
    assert describe(Ether(frame(pkt))) == text


def test_a_line_is_time_description_and_frame_length(utc: None) -> None:
    raw = frame(IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(id=1, seq=1) / (b"x" * 56))
    assert packet_line(raw, 1.5) == \
        f"00:00:01.500000 ICMP 10.0.0.2 > 10.0.0.1 echo-request id 1 seq 1 len {len(raw)}"
    other = bytes(Ether(src="00:15:5d:00:00:02", dst="01:80:c2:00:00:0e", type=0x88CC)) + \
        b"\0" * 20
    assert packet_line(other, 0.0).endswith(
        "00:15:5d:00:00:02 > 01:80:c2:00:00:0e ethertype 0x88cc len 34")
    assert packet_line(b"\x01\x02", 0.0).endswith(" len 2")


# progress and totals


def test_progress_counts_packets_bytes_seconds() -> None:
    assert progress_text(Totals(1, 98, 0.04)) == "1 packet, 98 bytes, 0.0 s"
    assert progress_text(Totals(12, 3500, 5.25)) == "12 packets, 3.4K bytes, 5.2 s"


def test_the_final_line_says_where_and_why() -> None:
    line = final_line(Totals(6, 588, 0.4, dropped=2), "hv1", "/tmp/a.pcap", "count reached")
    assert line == ("captured 6 packets, 588 bytes, 0.4 s on hv1 into /tmp/a.pcap, "
                    "2 dropped by the kernel (count reached)")
    assert final_line(Totals(0, 0, 1.0), "hb1", None, "time up") == \
        "captured 0 packets, 0 bytes, 1.0 s on hb1 (time up)"


def test_the_json_summary_has_the_documented_keys() -> None:
    got = summary_json(Totals(3, 300, 1.23456), "hv1", None)
    assert got == {"Interface": "hv1", "Packets": 3, "Bytes": 300, "Seconds": 1.235,
                   "File": None}


def test_progress_refreshes_at_most_four_times_a_second() -> None:
    progress = Progress()
    shown = [t / 100 for t in range(200) if progress.due(t / 100)]
    assert shown == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


# the read loop, on a socket pair standing for a packet socket


class PairSocket:
    """What Pump uses of a scapy listen socket, over a datagram socket pair."""

    def __init__(self) -> None:
        self.ins, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ins.setblocking(False)

    def recv_raw(self, size: int) -> tuple[None, bytes, float]:
        return None, self.ins.recv(size), 1000.0

    def close(self) -> None:
        self.ins.close()
        self.peer.close()


@pytest.fixture
def pair() -> Iterator[PairSocket]:
    sock = PairSocket()
    yield sock
    sock.close()


@pytest.fixture
def waker() -> Iterator[Waker]:
    w = Waker()
    yield w
    w.close()


def test_the_loop_stops_at_the_count_leaving_the_rest_queued(pair: PairSocket,
                                                             waker: Waker) -> None:
    got: list[bytes] = []
    for i in range(5):
        pair.peer.send(b"frame%d" % i)
    pump = Pump(pair, lambda f, ts: got.append(f), count=3)
    assert pump.run(waker) == "count reached"
    assert got == [b"frame0", b"frame1", b"frame2"]
    assert (pump.totals().packets, pump.totals().nbytes) == (3, 18)
    assert pair.ins.recv(100) == b"frame3"


def test_the_loop_stops_at_the_duration(pair: PairSocket, waker: Waker) -> None:
    pump = Pump(pair, lambda f, ts: None, duration=0.05)
    began = time.monotonic()
    assert pump.run(waker) == "time up"
    assert 0.05 <= time.monotonic() - began < 2
    assert pump.totals().seconds >= 0.05


def test_a_wake_up_stops_the_loop_after_what_was_queued(pair: PairSocket,
                                                        waker: Waker) -> None:
    got: list[bytes] = []
    for i in range(200):
        pair.peer.send(b"%d" % i)
    waker.wake()
    waker.wake()                      # twice: still one stop, no error
    pump = Pump(pair, lambda f, ts: got.append(f))
    assert pump.run(waker) == "stopped"
    assert got == [b"%d" % i for i in range(200)]


def test_the_loop_ticks_while_waiting(pair: PairSocket, waker: Waker) -> None:
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(1)
        if len(ticks) == 2:
            waker.wake()

    assert Pump(pair, lambda f, ts: None).run(waker, tick) == "stopped"
    assert len(ticks) == 2


# the pcap file


def test_the_pcap_file_holds_ethernet_frames_and_their_times(tmp_path: Path) -> None:
    path = str(tmp_path / "c.pcap")
    sink = PcapSink(path)
    with open(path, "rb") as f:          # header written at once, before any frame
        magic, _, _, _, _, _, linktype = struct.unpack("IHHIIII", f.read(24))
    assert (magic, linktype) == (0xA1B2C3D4, 1)
    frames = [frame(IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(seq=i)) for i in range(3)]
    for i, raw in enumerate(frames):
        sink.frame(raw, 1700000000.25 + i)
        assert len(rdpcap(path)) == i + 1     # flushed per frame
    sink.close()
    read = rdpcap(path)
    assert [bytes(p) for p in read] == frames
    assert [float(p.time) for p in read] == [1700000000.25 + i for i in range(3)]
    assert [p[ICMP].seq for p in read] == [0, 1, 2]


def test_an_empty_capture_is_a_valid_pcap(tmp_path: Path) -> None:
    path = str(tmp_path / "e.pcap")
    PcapSink(path).close()
    assert os.path.getsize(path) == 24 and len(rdpcap(path)) == 0


def test_a_recorder_checks_its_filter_before_listening() -> None:
    rec = Recorder(None, "hv1", "/nonexistent/x.pcap", "tcp port")
    with pytest.raises(InvalidRequest, match="bad filter"):
        rec.start()
    assert rec.packets == 0
