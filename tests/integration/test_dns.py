"""The daemon's DNS proxy on the NAT gateway, for real: dnsmasq in the outside namespace
plays the host's resolver, dig and glibc (getent) in the VM ask the gateway."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from nsutil import DaemonProc, wait_for, wait_listening

from hns.testing import Sandbox, SandboxVm

NAME = "example.test"
ADDRESS = "198.51.100.80"
DEAD = "198.51.100.53"          # an address of the outside namespace where nothing listens


def start_dnsmasq(sandbox: Sandbox) -> subprocess.Popen[Any]:
    proc = sandbox.outside.popen([
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        f"--listen-address={sandbox.outside_ip}", "--bind-interfaces", "--pid-file=",
        f"--address=/{NAME}/{ADDRESS}"])
    wait_listening(sandbox.outside, 53, udp=True)
    return proc


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
