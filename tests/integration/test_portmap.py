"""Kernel port mappings (HNS's PortMapping policy) with real clients: from the outside
at the host's address, from the host itself, from other VMs and from the VM itself
(hairpin), on one host address, after a reboot and across down/up."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.nsutil import bad_input_failures, serve_http_peer_echo, snapshot

from hns import naming
from hns.testing import Peer, Sandbox, SandboxVm


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def portmap_add(sandbox: Sandbox, vm: str, protocol: str, external: int, internal: int,
                *extra: str) -> None:
    ok(sandbox.hnsctl("portmap", "add", vm, "--protocol", protocol, "--external-port",
                      str(external), "--internal-port", str(internal), *extra))


def http_peer(peer: Peer, host: str, port: int, timeout: int = 10) -> str:
    """The client address the server saw, or curl's error."""
    result = peer.run(["curl", "-sS", "--max-time", str(timeout), f"http://{host}:{port}/"])
    return result.stdout.strip() if result.returncode == 0 else f"failed: {result.stderr}"


UdpEcho = Callable[[Peer, int], None]


@pytest.fixture
def udp_echo() -> Iterator[UdpEcho]:
    """``udp_echo(peer, port)``: a UDP server in the peer's namespace that answers each
    datagram with the sender's address (a socket and a thread: socat's forking UDP server
    is too slow to answer in time on a loaded machine, and UDP does not retransmit)."""
    socks: list[socket.socket] = []

    def serve(sock: socket.socket) -> None:
        while True:
            try:
                _, sender = sock.recvfrom(4096)
                if sender is None:  # shut down at teardown
                    return
                sock.sendto(f"{sender[0]}:{sender[1]}\n".encode(), sender)
            except OSError:  # closed at teardown
                return

    def start(peer: Peer, port: int) -> None:
        sock = peer.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))
        socks.append(sock)
        threading.Thread(target=serve, args=(sock,), daemon=True).start()

    yield start
    for sock in socks:
        with contextlib.suppress(OSError):  # ENOTCONN, but it wakes the thread (Linux)
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def no_http(peer: Peer, host: str, port: int) -> bool:
    """No HTTP answer (within 3 s)."""
    return http_peer(peer, host, port, timeout=3).startswith("failed")


def udp_peer(peer: Peer, host: str, port: int, source_port: int = 0,
             timeout: float = 10.0) -> str:
    """The client address a UDP echo server saw (see serve_udp_peer_echo), or ''."""
    sock = peer.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind(("0.0.0.0", source_port))
        sock.settimeout(timeout)
        sock.sendto(b"ping\n", (host, port))
        try:
            return sock.recv(4096).decode().strip().split(":")[0]
        except (TimeoutError, ConnectionRefusedError):
            return ""


def elements(sandbox: Sandbox) -> str:
    table = naming.nft_table_name(sandbox.service.instance)
    return "".join(ok(sandbox.host.run(["nft", "list", "map", "inet", table, name]))
                   for name in ("pm_any", "pm_addr"))


def test_tcp_from_outside_keeps_the_client_address(hns_sandbox: Sandbox,
                                                   nat_vm: SandboxVm) -> None:
    serve_http_peer_echo(nat_vm, 80)
    portmap_add(hns_sandbox, "vm0", "tcp", 8080, 80)
    assert http_peer(hns_sandbox.outside, hns_sandbox.uplink_ip, 8080) == hns_sandbox.outside_ip
    assert no_http(hns_sandbox.outside, hns_sandbox.uplink_ip, 8081)


def test_udp_from_outside_and_stale_conntrack_is_flushed(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, udp_echo: UdpEcho) -> None:
    udp_echo(nat_vm, 53)
    out, uplink = hns_sandbox.outside, hns_sandbox.uplink_ip
    # before the mapping: the host has a conntrack entry for this flow (not NATed)
    assert udp_peer(out, uplink, 5353, source_port=40053, timeout=1) == ""
    portmap_add(hns_sandbox, "vm0", "udp", 5353, 53)
    # the same flow again: it reaches the VM only if the stale entry was flushed
    assert udp_peer(out, uplink, 5353, source_port=40053) == hns_sandbox.outside_ip
    # and socat as the client (-t: wait for the answer after its stdin ends)
    answer = out.run(["socat", "-T", "10", "-t", "3", "-", f"UDP:{uplink}:5353"],
                     input="hello\n").stdout
    assert answer.split(":")[0] == hns_sandbox.outside_ip


def test_from_the_host_at_its_own_addresses_but_not_loopback(hns_sandbox: Sandbox,
                                                             nat_vm: SandboxVm) -> None:
    serve_http_peer_echo(nat_vm, 80)
    portmap_add(hns_sandbox, "vm0", "tcp", 8080, 80)
    assert http_peer(hns_sandbox.host, hns_sandbox.uplink_ip, 8080) == hns_sandbox.uplink_ip
    assert http_peer(hns_sandbox.host, nat_vm.gateway, 8080) == nat_vm.gateway
    assert no_http(hns_sandbox.host, "127.0.0.1", 8080)


def test_hairpin_from_another_vm_and_from_the_same_vm(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, make_vm: Callable[..., SandboxVm],
        udp_echo: UdpEcho) -> None:
    other = make_vm("other")
    serve_http_peer_echo(nat_vm, 80)
    udp_echo(nat_vm, 53)
    portmap_add(hns_sandbox, "vm0", "tcp", 8080, 80)
    portmap_add(hns_sandbox, "vm0", "udp", 5353, 53)
    # masqueraded to the gateway: the reply must come back through the host
    for client in (other, nat_vm):
        assert http_peer(client, hns_sandbox.uplink_ip, 8080) == nat_vm.gateway, client
        assert http_peer(client, nat_vm.gateway, 8080) == nat_vm.gateway, client
        assert udp_peer(client, hns_sandbox.uplink_ip, 5353) == nat_vm.gateway, client
    # a VM reaching another directly is not masqueraded (nothing changed there)
    assert http_peer(other, nat_vm.ip, 80) == other.ip


def test_mapping_on_one_host_address(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                     make_vm: Callable[..., SandboxVm]) -> None:
    second = "198.51.100.3"
    ok(hns_sandbox.host.run(["ip", "addr", "add", f"{second}/24", "dev", "up0"]))
    other = make_vm("other")
    serve_http_peer_echo(nat_vm, 80)
    serve_http_peer_echo(other, 80)
    portmap_add(hns_sandbox, "vm0", "tcp", 8080, 80, "--host-address", hns_sandbox.uplink_ip)
    portmap_add(hns_sandbox, "other", "tcp", 8080, 80, "--host-address", second)
    out = hns_sandbox.outside
    assert http_peer(out, hns_sandbox.uplink_ip, 8080) == hns_sandbox.outside_ip
    assert http_peer(out, second, 8080) == hns_sandbox.outside_ip
    listed = json.loads(ok(hns_sandbox.hnsctl("--json", "portmap", "list")))
    assert [(m["Vm"], m["HostAddress"]) for m in listed] == [
        ("other", second), ("vm0", hns_sandbox.uplink_ip)]
    # which VM answered: stop one server, the other address still works
    ok(hns_sandbox.hnsctl("portmap", "delete", "vm0", "--protocol", "tcp", "--external-port",
                          "8080", "--host-address", hns_sandbox.uplink_ip))
    assert no_http(out, hns_sandbox.uplink_ip, 8080)
    assert http_peer(out, second, 8080) == hns_sandbox.outside_ip
    assert no_http(hns_sandbox.host, nat_vm.gateway, 8080)


def test_vm_show_and_delete(hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    serve_http_peer_echo(nat_vm, 80)
    portmap_add(hns_sandbox, "vm0", "tcp", 8080, 80)
    shown = json.loads(ok(hns_sandbox.hnsctl("--json", "vm", "show", "vm0")))
    assert shown["Policies"] == [{"Type": "PortMapping", "Settings": {
        "Protocol": 6, "InternalPort": 80, "ExternalPort": 8080, "VIP": ""}}]
    assert "tcp . 8080 : " in elements(hns_sandbox)
    delete = ("portmap", "delete", "vm0", "--protocol", "tcp", "--external-port", "8080")
    ok(hns_sandbox.hnsctl(*delete))
    assert "8080" not in elements(hns_sandbox)
    assert no_http(hns_sandbox.outside, hns_sandbox.uplink_ip, 8080)
    again = hns_sandbox.hnsctl(*delete)
    assert again.returncode == 0 and "nothing to delete" in again.stderr


BAD = [
    ("portmap", "add", "vm0", "--protocol", "tcp", "--external-port", "8080",
     "--internal-port", "81"),
    ("portmap", "add", "vm1", "--protocol", "tcp", "--external-port", "8080",
     "--internal-port", "80", "--host-address", "198.51.100.2"),
    ("portmap", "add", "vm1", "--protocol", "sctp", "--external-port", "1",
     "--internal-port", "1"),
    ("portmap", "add", "vm1", "--protocol", "tcp", "--external-port", "0",
     "--internal-port", "1"),
    ("portmap", "add", "vm1", "--protocol", "tcp", "--external-port", "65536",
     "--internal-port", "1"),
    ("portmap", "add", "vm1", "--protocol", "tcp", "--external-port", "x",
     "--internal-port", "1"),
    ("portmap", "add", "nope", "--protocol", "tcp", "--external-port", "1",
     "--internal-port", "1"),
    ("portmap", "add", "vm1", "--protocol", "tcp", "--external-port", "1",
     "--internal-port", "1", "--host-address", "198.51.100"),
    ("portmap", "add", "vm1", "--protocol", "udp", "--external-port", "1"),
    ("portmap", "delete", "vm1", "--protocol", "tcp", "--external-port", "8080"),
    ("portmap", "list", "nope"),
]


def test_bad_input_changes_nothing(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                   make_vm: Callable[..., SandboxVm]) -> None:
    make_vm("vm1")
    portmap_add(hns_sandbox, "vm0", "tcp", 8080, 80)
    before = snapshot(hns_sandbox)
    assert bad_input_failures(hns_sandbox, BAD) == []
    assert snapshot(hns_sandbox) == before


def test_nft_failure_exits_1_and_leaves_nothing(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                                tmp_path: Path) -> None:
    portmap_add(hns_sandbox, "vm0", "tcp", 8080, 80)
    before = snapshot(hns_sandbox)
    fake = tmp_path / "nft"
    fake.write_text("#!/bin/sh\necho 'Error: Could not process rule: simulated' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = hns_sandbox.hnsctl("portmap", "add", "vm0", "--protocol", "tcp",
                                "--external-port", "9090", "--internal-port", "90", env=env)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "simulated" in result.stderr
    assert snapshot(hns_sandbox) == before


def test_delete_vm_deletes_its_mappings(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                        make_vm: Callable[..., SandboxVm]) -> None:
    make_vm("keep")
    portmap_add(hns_sandbox, "vm0", "tcp", 8080, 80)
    portmap_add(hns_sandbox, "vm0", "udp", 5353, 53, "--host-address", hns_sandbox.uplink_ip)
    portmap_add(hns_sandbox, "keep", "tcp", 9090, 90)
    ok(hns_sandbox.hnsctl("vm", "delete", "vm0"))
    assert [m["Vm"] for m in json.loads(ok(hns_sandbox.hnsctl("--json", "portmap", "list")))] \
        == ["keep"]
    found = elements(hns_sandbox)
    assert "8080" not in found and "5353" not in found and "tcp . 9090" in found


def wsl_peer(sandbox: Sandbox) -> SandboxVm:
    """The VM ``wsl`` made by ``hnsctl up``, with the sandbox's helpers (and cleanup)."""
    vm = SandboxVm(sandbox.service.get_vm("wsl"))
    sandbox.vms.append(vm)
    return vm


def _reboot(sandbox: Sandbox) -> None:
    """The kernel objects go, the state directory stays."""
    for vm in sandbox.service.list_vms():
        subprocess.run(["ip", "netns", "del", vm.netns], check=True)
    for net in sandbox.service.list_networks():
        ok(sandbox.host.run(["ip", "link", "del", net.bridge]))
    ok(sandbox.host.run(["nft", "delete", "table", "inet",
                         naming.nft_table_name(sandbox.service.instance)]))


def test_mappings_survive_a_reboot(hns_sandbox: Sandbox) -> None:
    ok(hns_sandbox.hnsctl("up"))
    portmap_add(hns_sandbox, "wsl", "tcp", 8080, 80)
    _reboot(hns_sandbox)
    ok(hns_sandbox.hnsctl("restore"))
    vm = wsl_peer(hns_sandbox)
    serve_http_peer_echo(vm, 80)
    assert http_peer(hns_sandbox.outside, hns_sandbox.uplink_ip, 8080) == hns_sandbox.outside_ip
    assert http_peer(vm, hns_sandbox.uplink_ip, 8080) == vm.gateway  # hairpin again


def test_down_then_up_keeps_the_mappings_of_wsl(hns_sandbox: Sandbox, udp_echo: UdpEcho) -> None:
    ok(hns_sandbox.hnsctl("up"))
    portmap_add(hns_sandbox, "wsl", "tcp", 8080, 80)
    portmap_add(hns_sandbox, "wsl", "udp", 5353, 53, "--host-address", hns_sandbox.uplink_ip)
    listed = ok(hns_sandbox.hnsctl("--json", "portmap", "list"))
    ok(hns_sandbox.hnsctl("down"))
    assert json.loads(ok(hns_sandbox.hnsctl("--json", "portmap", "list"))) == []
    table = naming.nft_table_name(hns_sandbox.service.instance)
    assert table not in ok(hns_sandbox.host.run(["nft", "list", "tables"]))  # no network left
    ok(hns_sandbox.hnsctl("up"))
    assert ok(hns_sandbox.hnsctl("--json", "portmap", "list")) == listed
    vm = wsl_peer(hns_sandbox)
    serve_http_peer_echo(vm, 80)
    udp_echo(vm, 53)
    assert http_peer(hns_sandbox.outside, hns_sandbox.uplink_ip, 8080) == hns_sandbox.outside_ip
    assert udp_peer(hns_sandbox.outside, hns_sandbox.uplink_ip, 5353) == hns_sandbox.outside_ip
    ok(hns_sandbox.hnsctl("up"))  # idempotent: nothing re-added twice
    assert ok(hns_sandbox.hnsctl("--json", "portmap", "list")) == listed


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_many_mappings_one_lookup(hns_sandbox: Sandbox, nat_vm: SandboxVm, udp_echo: UdpEcho,
                                  protocol: str) -> None:
    from hns.model import PortMapping, Protocol
    proto = Protocol.parse(protocol)
    hns_sandbox.service.add_port_mappings(
        [PortMapping("vm0", proto, port, 80) for port in range(20000, 22000)])
    assert elements(hns_sandbox).count(f"{protocol} . ") == 2000
    if protocol == "tcp":
        serve_http_peer_echo(nat_vm, 80)
        assert http_peer(hns_sandbox.outside, hns_sandbox.uplink_ip, 21999) \
            == hns_sandbox.outside_ip
    else:
        udp_echo(nat_vm, 80)
        assert udp_peer(hns_sandbox.outside, hns_sandbox.uplink_ip, 20000) \
            == hns_sandbox.outside_ip
