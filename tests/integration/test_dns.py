"""The daemon's DNS proxy on the NAT gateway, for real: dnsmasq in the outside namespace
plays the host's resolver, dig and glibc (getent) in the VM ask the gateway.  The proxy
answers its network's VMs only (not the outside, not the host), and takes from an
upstream only the answer to the query it sent, on the socket it sent it from."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers.nsutil import DNS_ADDRESS as ADDRESS
from helpers.nsutil import DNS_NAME as NAME
from helpers.nsutil import DaemonProc, start_dnsmasq, wait_for, wait_listening

from hns.testing import Sandbox, SandboxVm
from portproxy import dnsmsg

DEAD = "198.51.100.53"          # an address of the outside namespace where nothing listens


@pytest.fixture
def dnsmasq(hns_sandbox: Sandbox) -> subprocess.Popen[Any]:
    """The host's resolver: dnsmasq on the outside peer, named in the host's resolv.conf
    (before the VM is made, so the VM's resolv.conf has it as fallback too)."""
    hns_sandbox.set_host_resolv(f"nameserver {hns_sandbox.outside_ip}\n")
    return start_dnsmasq(hns_sandbox)


@pytest.fixture
def vm(dnsmasq: subprocess.Popen[Any], nat_vm: SandboxVm) -> SandboxVm:
    return nat_vm


@pytest.fixture
def daemon(hns_sandbox: Sandbox, vm: SandboxVm) -> Iterator[DaemonProc]:
    d = DaemonProc(hns_sandbox)
    d.start()
    wait_for(lambda: dns_entry(d)["State"] == "listening", "the DNS listener")
    yield d
    d.kill()


def dns_entry(daemon: DaemonProc, network: str = "nat") -> dict[str, Any]:
    for entry in daemon.status().get("Dns", []):
        if entry["Network"] == network:
            return dict(entry)
    raise AssertionError(f"no DNS listener for {network!r} in {daemon.status()}")


def dig(vm: SandboxVm, *args: str) -> subprocess.CompletedProcess[str]:
    return vm.run(["dig", "+tries=1", "+time=10", f"@{vm.gateway}", NAME, *args])  # type: ignore[no-any-return]


def status_of(result: subprocess.CompletedProcess[str]) -> str:
    found = re.search(r"status: (\w+)", result.stdout)
    return found.group(1) if found else f"no answer: {result.stdout}{result.stderr}"


def test_dig_over_udp_and_tcp_and_glibc_through_resolv_conf(
        hns_sandbox: Sandbox, vm: SandboxVm, daemon: DaemonProc) -> None:
    udp = dig(vm, "+short")
    assert udp.returncode == 0 and udp.stdout.split() == [ADDRESS], udp.stdout + udp.stderr
    tcp = dig(vm, "+short", "+tcp")
    assert tcp.returncode == 0 and tcp.stdout.split() == [ADDRESS], tcp.stdout + tcp.stderr
    before = dns_entry(daemon)["Queries"]
    glibc = vm.run(["getent", "hosts", NAME])
    assert glibc.returncode == 0 and glibc.stdout.split() == [ADDRESS, NAME], glibc.stderr
    assert dns_entry(daemon)["Queries"] > before          # asked the gateway, not the fallback

    entry = dns_entry(daemon)
    assert entry["Listen"] == f"{vm.gateway}:53"
    assert entry["Upstreams"] == [f"{hns_sandbox.outside_ip}:53"]
    assert entry["Failures"] == 0
    text = hns_sandbox.hnsctl("status").stdout
    assert "dns proxy:" in text and f"{vm.gateway}:53" in text


def test_upstream_down_then_fixed(hns_sandbox: Sandbox, vm: SandboxVm,
                                  daemon: DaemonProc) -> None:
    added = hns_sandbox.outside.run(["ip", "addr", "add", f"{DEAD}/32", "dev", "out0"])
    assert added.returncode == 0, added.stderr
    hns_sandbox.set_host_resolv(f"nameserver {DEAD}\n")
    wait_for(lambda: dns_entry(daemon)["Upstreams"] == [f"{DEAD}:53"]
             or status_of(dig(vm)) == "SERVFAIL", "the new resolv.conf")
    down = dig(vm)
    assert status_of(down) == "SERVFAIL"
    assert dns_entry(daemon)["Failures"] >= 1
    assert daemon.proc is not None and daemon.proc.poll() is None

    hns_sandbox.set_host_resolv(f"nameserver {hns_sandbox.outside_ip}\n")
    wait_for(lambda: dig(vm, "+short").stdout.split() == [ADDRESS], "the fixed upstream",
             attempts=50)
    assert dns_entry(daemon)["Upstreams"] == [f"{hns_sandbox.outside_ip}:53"]


def test_upstream_answering_garbage_gives_servfail(hns_sandbox: Sandbox, vm: SandboxVm,
                                                  dnsmasq: subprocess.Popen[Any],
                                                  daemon: DaemonProc) -> None:
    dnsmasq.kill()
    dnsmasq.wait()
    hns_sandbox.outside.popen(["socat", f"UDP-RECVFROM:53,bind={hns_sandbox.outside_ip},fork",
                               "SYSTEM:echo this-is-not-a-dns-answer"])
    wait_listening(hns_sandbox.outside, 53, udp=True)
    assert status_of(dig(vm)) == "SERVFAIL"
    # on a loaded machine socat may answer after the query timed out (and its socket was
    # closed): ask again until one garbage answer arrived in time to be read and dropped
    wait_for(lambda: status_of(dig(vm)) == "SERVFAIL"
             and daemon.status()["DnsUpstream"]["Dropped"] >= 1, "a garbage answer dropped",
             attempts=20)
    assert daemon.status()["Running"] is True
    assert status_of(dig(vm, "+tcp")) == "SERVFAIL"     # a TCP client: the same path


def test_port_53_taken_is_reported_and_retried(hns_sandbox: Sandbox, vm: SandboxVm) -> None:
    squatter = hns_sandbox.host.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind((vm.gateway, 53))
    d = DaemonProc(hns_sandbox)
    try:
        d.start()
        wait_for(lambda: "in use" in dns_entry(d)["State"], "the conflict to show")
        squatter.close()
        wait_for(lambda: dns_entry(d)["State"] == "listening", "the retry")
        assert dig(vm, "+short").stdout.split() == [ADDRESS]
    finally:
        squatter.close()
        d.kill()


def test_without_the_daemon_glibc_falls_back_to_the_host_nameserver(
        vm: SandboxVm) -> None:
    resolv = vm.run(["cat", "/etc/resolv.conf"]).stdout
    assert re.findall(r"^nameserver (\S+)", resolv, re.M) == [vm.gateway, "198.51.100.1"]
    glibc = vm.run(["getent", "hosts", NAME])   # the gateway refuses (ICMP): next server
    assert glibc.returncode == 0 and glibc.stdout.split() == [ADDRESS, NAME], glibc.stderr


def ask(peer: Any, gateway: str, *args: str) -> subprocess.CompletedProcess[str]:
    return peer.run(["dig", "+tries=1", "+time=2", f"@{gateway}", NAME, *args])  # type: ignore[no-any-return]


def assert_no_answer(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0 and "status:" not in result.stdout, result.stdout


def test_only_the_network_s_vms_are_answered(hns_sandbox: Sandbox, vm: SandboxVm,
                                             daemon: DaemonProc) -> None:
    subnet = str(hns_sandbox.service.get_network("nat").subnet)
    outside, host = hns_sandbox.outside, hns_sandbox.host
    routed = outside.run(["ip", "route", "add", subnet, "via", hns_sandbox.uplink_ip])
    assert routed.returncode == 0, routed.stderr
    reach = outside.run(["ping", "-c", "1", "-W", "5", vm.gateway])
    assert reach.returncode == 0, reach.stdout      # the outside reaches the gateway

    for peer in (outside, host):                    # UDP: dropped unanswered, no ICMP
        assert_no_answer(ask(peer, vm.gateway))
        assert_no_answer(ask(peer, vm.gateway, "+tcp"))    # TCP: refused or reset
    # the outside's TCP is refused by the kernel (another interface); the host's own may
    # be let in (its local route names the bridge) and is reset by the proxy
    ignored = dns_entry(daemon)["Ignored"]
    assert ignored >= 2
    assert dns_entry(daemon)["Queries"] == 0

    # an outsider writing from an address of the subnet, past reverse-path filtering
    for conf in ("all", "up0"):
        host.run(["sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0"])
    spoofed = vm.ip.rsplit(".", 1)[0] + ".250"
    added = outside.run(["ip", "addr", "add", f"{spoofed}/32", "dev", "lo"])
    assert added.returncode == 0, added.stderr
    assert_no_answer(ask(outside, vm.gateway, "-b", spoofed))
    wait_for(lambda: dns_entry(daemon)["Ignored"] == ignored + 1, "the spoofed query ignored")
    assert dns_entry(daemon)["Queries"] == 0

    assert dig(vm, "+short").stdout.split() == [ADDRESS]
    assert dig(vm, "+short", "+tcp").stdout.split() == [ADDRESS]
    assert dns_entry(daemon)["Queries"] == 2


class SpoofingUpstream:
    """A resolver in the outside namespace that answers each query first with spoofs
    (the right answer from another port and from another address, an answer with another
    id, one to another question), all naming ``EVIL``, then rightly."""

    EVIL = "203.0.113.66"

    def __init__(self, sandbox: Sandbox, spoof: bool = True) -> None:
        added = sandbox.outside.run(["ip", "addr", "add", f"{DEAD}/32", "dev", "out0"])
        assert added.returncode == 0, added.stderr
        self.spoof = spoof
        self.peers: list[tuple[str, int]] = []
        self.sockets = [self._bound(sandbox, host, port) for host, port in (
            (sandbox.outside_ip, 53), (sandbox.outside_ip, 5353), (DEAD, 53))]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def _bound(sandbox: Sandbox, host: str, port: int) -> socket.socket:
        sock = sandbox.outside.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))
        return sock

    def _serve(self) -> None:
        real, other_port, other_address = self.sockets
        while True:
            try:
                query, peer = real.recvfrom(65535)
            except OSError:
                return
            self.peers.append(peer)
            if self.spoof:
                evil = answer_to(query, self.EVIL)
                other_port.sendto(evil, peer)
                other_address.sendto(evil, peer)
                real.sendto(bytes([query[0] ^ 0x5A]) + evil[1:], peer)
                other = bytearray(query)
                other[13] ^= 0x1D                     # "example" -> "xxample": another name
                real.sendto(answer_to(bytes(other), self.EVIL), peer)
                time.sleep(0.2)                       # pacing: the spoofs arrive first
            real.sendto(answer_to(query, ADDRESS), peer)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def answer_to(query: bytes, address: str) -> bytes:
    """An A answer to ``query``: its id and question, one record (the query's EDNS left out)."""
    _, end = dnsmsg.parse_question(query)
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
    return query[:2] + struct.pack("!5H", 0x8180, 1, 1, 0, 0) + query[12:end] + rr


@pytest.fixture
def spoofer(hns_sandbox: Sandbox) -> Iterator[SpoofingUpstream]:
    hns_sandbox.set_host_resolv(f"nameserver {hns_sandbox.outside_ip}\n")
    upstream = SpoofingUpstream(hns_sandbox)
    yield upstream
    upstream.close()


def test_spoofed_upstream_answers_are_not_taken(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                                spoofer: SpoofingUpstream) -> None:
    d = DaemonProc(hns_sandbox)
    try:
        d.start()
        wait_for(lambda: dns_entry(d)["State"] == "listening", "the DNS listener")
        for extra in ((), ("+tcp",)):
            answer = dig(nat_vm, "+short", *extra)
            assert answer.stdout.split() == [ADDRESS], answer.stdout + answer.stderr
        assert len(spoofer.peers) == 2
        wait_for(lambda: d.status()["DnsUpstream"]["Dropped"] == 8, "8 spoofs dropped")
        assert dns_entry(d)["Failures"] == 0
    finally:
        d.kill()


def test_each_upstream_query_has_a_source_port_of_its_own(
        hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    hns_sandbox.set_host_resolv(f"nameserver {hns_sandbox.outside_ip}\n")
    upstream = SpoofingUpstream(hns_sandbox, spoof=False)
    d = DaemonProc(hns_sandbox)
    try:
        d.start()
        wait_for(lambda: dns_entry(d)["State"] == "listening", "the DNS listener")
        for _ in range(3):
            assert dig(nat_vm, "+short").stdout.split() == [ADDRESS]
        ports = [port for _, port in upstream.peers]
        assert len(ports) == 3 and len(set(ports)) >= 2, ports
        assert ports[0] != ports[1] or ports[1] != ports[2], ports
    finally:
        d.kill()
        upstream.close()


def test_a_bridge_made_again_is_served_again(hns_sandbox: Sandbox, vm: SandboxVm,
                                             daemon: DaemonProc) -> None:
    bridge = hns_sandbox.service.get_network("nat").bridge
    deleted = hns_sandbox.host.run(["ip", "link", "del", bridge])
    assert deleted.returncode == 0, deleted.stderr
    restored = hns_sandbox.hnsctl("restore")
    assert restored.returncode == 0, restored.stderr
    wait_for(lambda: dig(vm, "+short").stdout.split() == [ADDRESS], "an answer again",
             attempts=40, interval=0.25)
    assert dig(vm, "+short", "+tcp").stdout.split() == [ADDRESS]
    assert dns_entry(daemon)["State"] == "listening"
