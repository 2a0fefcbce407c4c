"""Mirrored networks with the daemon: inbound at the host's address, loopback both ways,
conflicts with the host and ignored ports -- with curl, socat and real sockets."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from helpers.nsutil import (
    DaemonProc,
    curl,
    reaches,
    refused,
    serve,
    serve_udp_peer_echo,
    stop,
    udp_ask,
    wait_for,
    wait_listening,
)

from hns.testing import Peer, Sandbox, SandboxVm

HOST = "198.51.100.2"
HOST6 = "2001:db8:100::2"
OUTSIDE = "198.51.100.1"


def mirrored(sandbox: Sandbox, name: str = "M", *flags: str) -> str:
    result = sandbox.hnsctl("network", "create", name, "--type", "mirrored", *flags)
    assert result.returncode == 0, result.stderr
    return name


@pytest.fixture
def mvm(hns_sandbox: Sandbox) -> SandboxVm:
    return hns_sandbox.vm("box", mirrored(hns_sandbox))


def rows(daemon: DaemonProc, vm: str | None = None) -> list[dict[str, Any]]:
    return [r for r in daemon.status().get("Mirrored", []) if vm is None or r["Vm"] == vm]


def state_of(daemon: DaemonProc, vm: str, port: int, family: str = "ipv4",
             direction: str = "to vm", protocol: str = "tcp") -> str | None:
    for r in rows(daemon, vm):
        if (r["Protocol"], r["Family"], r["Port"], r["Direction"]) == (
                protocol, family, port, direction):
            return str(r["State"])
    return None


def until(predicate: Callable[[], bool], what: str) -> None:
    wait_for(predicate, what, attempts=300)


def serve_host(peer: Peer, port: int, bind: str, answer: str = "host") -> subprocess.Popen[Any]:
    proc = peer.popen(["socat", f"TCP-LISTEN:{port},reuseaddr,fork,bind={bind}",
                       f"SYSTEM:sed -n /^.$/q; echo HTTP/1.0 200 OK; echo; echo {answer}"])
    wait_listening(peer, port)
    return proc


def test_outside_reaches_a_vm_server_at_the_host_address(
        hns_sandbox: Sandbox, mvm: SandboxVm, daemon: DaemonProc) -> None:
    server = serve(mvm, 8080)
    # the VM's server sees the outside client's own address
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:8080/", OUTSIDE),
          "the outside to reach the VM at the host's address")
    assert state_of(daemon, "box", 8080) == "forwarding"
    stop(server)
    until(lambda: refused(hns_sandbox.outside, f"http://{HOST}:8080/"),
          "the port to be released")
    until(lambda: state_of(daemon, "box", 8080) is None, "the status row to go")
    # released to the host: a host server can take the port on every address now
    serve_host(hns_sandbox.host, 8080, "0.0.0.0")
    assert reaches(hns_sandbox.outside, f"http://{HOST}:8080/", "host")


def test_outside_reaches_a_vm_server_over_ipv6(hns_sandbox: Sandbox, mvm: SandboxVm,
                                               daemon: DaemonProc) -> None:
    serve(mvm, 8081, "TCP6-LISTEN", bind="[::]", extra=",ipv6only=1")

    def peer_seen() -> str:
        result = curl(hns_sandbox.outside, f"http://[{HOST6}]:8081/")
        return str(ipaddress.ip_address(result.stdout.strip().strip("[]"))) \
            if result.returncode == 0 else ""
    until(lambda: peer_seen() == "2001:db8:100::1",
          "the outside to reach the VM at the host's IPv6 address")
    assert refused(hns_sandbox.outside, f"http://{HOST}:8081/")     # v6only: not on IPv4


def test_outside_reaches_a_vm_udp_server(hns_sandbox: Sandbox, mvm: SandboxVm,
                                         daemon: DaemonProc) -> None:
    serve_udp_peer_echo(mvm, 5353)
    until(lambda: udp_ask(hns_sandbox.outside, HOST, 5353, tries=1) == OUTSIDE,
          "a UDP answer from the VM at the host's address")


def test_server_bound_to_the_mirrored_address(hns_sandbox: Sandbox, mvm: SandboxVm,
                                              daemon: DaemonProc) -> None:
    serve(mvm, 8082, bind=HOST)
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:8082/", OUTSIDE),
          "the outside to reach a server bound to the mirrored address")
    until(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8082/"),
          "host loopback to reach it too")


def test_host_loopback_reaches_the_vm(hns_sandbox: Sandbox, mvm: SandboxVm,
                                      daemon: DaemonProc) -> None:
    serve(mvm, 8083)
    until(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8083/", "127.0.0.1"),
          "host 127.0.0.1 to reach the VM (a loopback client there)")


def test_vm_loopback_loopback_server_is_not_exposed(hns_sandbox: Sandbox, mvm: SandboxVm,
                                                    daemon: DaemonProc) -> None:
    serve(mvm, 8084, bind="127.0.0.1")
    until(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8084/"),
          "host loopback to reach the VM's loopback server")
    assert refused(hns_sandbox.outside, f"http://{HOST}:8084/")


def test_vm_loopback_reaches_a_host_loopback_service(hns_sandbox: Sandbox, mvm: SandboxVm,
                                                     daemon: DaemonProc) -> None:
    server = serve_host(hns_sandbox.host, 9090, "127.0.0.1")
    until(lambda: reaches(mvm, "http://127.0.0.1:9090/", "host"),
          "the VM's 127.0.0.1:9090 to reach the host's")
    assert state_of(daemon, "box", 9090, direction="to host") == "forwarding"
    # while the host holds the port the VM cannot take it (WSL's rule) ...
    taken = mvm.run(["socat", "TCP4-LISTEN:9090,bind=0.0.0.0", "-"], timeout=10)
    assert taken.returncode != 0 and "Address already in use" in taken.stderr
    stop(server)
    # ... and when the host lets go, so does the VM's loopback
    until(lambda: state_of(daemon, "box", 9090, direction="to host") is None,
          "the reverse forward to go")
    assert refused(mvm, "http://127.0.0.1:9090/")


def test_a_port_the_host_listens_on_is_not_taken_over(hns_sandbox: Sandbox, mvm: SandboxVm,
                                                      daemon: DaemonProc) -> None:
    host_server = serve_host(hns_sandbox.host, 7070, "0.0.0.0")
    serve(mvm, 7070, bind=HOST)      # a wildcard bind is refused there: see the test above
    until(lambda: (state_of(daemon, "box", 7070) or "").startswith("conflict"),
          "the conflict in the status")
    assert state_of(daemon, "box", 7070) == "conflict: the host listens on it"
    assert reaches(hns_sandbox.outside, f"http://{HOST}:7070/", "host")
    stop(host_server)
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:7070/", OUTSIDE),
          "the VM to get the port once the host lets go")


def test_ignored_ports_are_never_forwarded(hns_sandbox: Sandbox, daemon: DaemonProc) -> None:
    vm = hns_sandbox.vm("box", mirrored(hns_sandbox, "M", "--ignored-ports", "6000-6001"))
    serve_host(hns_sandbox.host, 6001, "127.0.0.1")
    serve(vm, 6000)
    serve(vm, 6002)                              # not ignored: a witness
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:6002/", OUTSIDE),
          "the witness port to be forwarded")
    assert refused(hns_sandbox.outside, f"http://{HOST}:6000/")
    assert refused(hns_sandbox.host, "http://127.0.0.1:6000/")
    assert state_of(daemon, "box", 6000) is None
    assert state_of(daemon, "box", 6001, direction="to host") is None
    serve(vm, 6001, bind="0.0.0.0")              # the host's ignored port is free in the VM


def test_two_mirrored_vms_first_one_wins(hns_sandbox: Sandbox, daemon: DaemonProc) -> None:
    net = mirrored(hns_sandbox)
    first, second = hns_sandbox.vm("one", net), hns_sandbox.vm("two", net)
    serve(first, 8090, answer="sed -n /^.$/q; echo HTTP/1.0 200 OK; echo; echo one")
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:8090/", "one"), "vm one")
    serve(second, 8090, answer="sed -n /^.$/q; echo HTTP/1.0 200 OK; echo; echo two")
    until(lambda: state_of(daemon, "two", 8090) == "conflict: held by vm one",
          "vm two's conflict")
    assert reaches(hns_sandbox.outside, f"http://{HOST}:8090/", "one")


def test_mirrored_beside_nat(hns_sandbox: Sandbox, mvm: SandboxVm, nat_vm: SandboxVm,
                             daemon: DaemonProc) -> None:
    serve(mvm, 8085, answer="sed -n /^.$/q; echo HTTP/1.0 200 OK; echo; echo mirrored")
    serve(nat_vm, 8086, answer="sed -n /^.$/q; echo HTTP/1.0 200 OK; echo; echo nat")
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:8085/", "mirrored"),
          "the mirrored VM from outside")
    until(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8086/", "nat"),
          "the NAT VM at host localhost")
    assert refused(hns_sandbox.outside, f"http://{HOST}:8086/")   # NAT: no port mapping
    result = curl(hns_sandbox.outside, f"http://{HOST}:8085/")
    assert result.stdout.strip() == "mirrored"


def test_daemon_stop_removes_the_inbound_table(hns_sandbox: Sandbox, mvm: SandboxVm,
                                               daemon: DaemonProc) -> None:
    table = f"inet hns-{hns_sandbox.service.instance}-mirror"
    tables = hns_sandbox.host.run(["nft", "list", "tables"]).stdout
    assert table in tables
    assert daemon.stop() == 0
    assert table not in hns_sandbox.host.run(["nft", "list", "tables"]).stdout


def test_host_address_loopback(hns_sandbox: Sandbox, daemon: DaemonProc) -> None:
    on = hns_sandbox.vm("on", mirrored(hns_sandbox, "On", "--host-address-loopback", "on"))
    serve(on, 8087)
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:8087/", OUTSIDE),
          "the port to be forwarded")
    # the host reaching its own address reaches the VM, from the transit gateway
    result = curl(hns_sandbox.host, f"http://{HOST}:8087/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(hns_sandbox.service.get_network("On").gateway)
    # and the VM reaching the host's address reaches the host's services
    serve_host(hns_sandbox.host, 9191, "0.0.0.0")
    until(lambda: reaches(on, f"http://{HOST}:9191/", "host"),
          "the VM to reach a host service at the host's address")
    assert reaches(on, f"http://{HOST}:8087/", HOST)   # its own port: itself


def test_without_host_address_loopback_the_host_address_is_the_hosts(
        hns_sandbox: Sandbox, mvm: SandboxVm, daemon: DaemonProc) -> None:
    serve(mvm, 8088)
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:8088/", OUTSIDE),
          "the port to be forwarded")
    assert refused(hns_sandbox.host, f"http://{HOST}:8088/")
    serve_host(hns_sandbox.host, 9192, "0.0.0.0")
    until(lambda: reaches(mvm, "http://127.0.0.1:9192/", "host"), "the loopback way")
    assert refused(mvm, f"http://{HOST}:9192/")       # the address is the VM's own


def test_vm_addresses_follow_the_host(hns_sandbox: Sandbox, mvm: SandboxVm,
                                      daemon: DaemonProc) -> None:
    def vm_addresses() -> str:
        return str(mvm.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout)

    hns_sandbox.host.run(["ip", "addr", "add", "198.51.100.9/24", "dev", "up0"], check=True)
    hns_sandbox.host.run(["ip", "-6", "addr", "add", "2001:db8:100::9/64", "dev", "up0",
                          "nodad"], check=True)
    until(lambda: "198.51.100.9/24" in vm_addresses() and "2001:db8:100::9/64"
          in vm_addresses(), "the new host addresses in the VM")
    hns_sandbox.host.run(["ip", "addr", "del", "198.51.100.9/24", "dev", "up0"], check=True)
    until(lambda: "198.51.100.9" not in vm_addresses(), "the removed address to go")
    assert "198.51.100.2/24" in vm_addresses()


def test_gc_removes_the_table_of_a_killed_daemon(hns_sandbox: Sandbox, mvm: SandboxVm,
                                                 daemon: DaemonProc) -> None:
    table = f"inet hns-{hns_sandbox.service.instance}-mirror"
    daemon.kill()                                   # SIGKILL: no clean-up of its own
    assert table in hns_sandbox.host.run(["nft", "list", "tables"]).stdout
    assert hns_sandbox.hnsctl("vm", "delete", "box").returncode == 0
    assert hns_sandbox.hnsctl("network", "delete", "M").returncode == 0
    result = hns_sandbox.hnsctl("gc")
    assert result.returncode == 0, result.stderr
    assert table in result.stdout
    assert table not in hns_sandbox.host.run(["nft", "list", "tables"]).stdout


def test_names_resolve_through_the_gateway(hns_sandbox: Sandbox, daemon: DaemonProc) -> None:
    from test_dns import ADDRESS, NAME, start_dnsmasq
    hns_sandbox.set_host_resolv(f"nameserver {hns_sandbox.outside_ip}\n")
    start_dnsmasq(hns_sandbox)
    vm = hns_sandbox.vm("box", mirrored(hns_sandbox))
    gateway = str(hns_sandbox.service.get_network("M").gateway)
    until(lambda: any(e["Network"] == "M" and e["State"] == "listening"
                      for e in daemon.status().get("Dns", [])), "the DNS listener")
    answer = vm.run(["dig", "+short", "+tries=1", "+time=10", f"@{gateway}", NAME])
    assert answer.stdout.split() == [ADDRESS], answer.stdout + answer.stderr
    glibc = vm.run(["getent", "hosts", NAME])
    assert glibc.returncode == 0 and glibc.stdout.split() == [ADDRESS, NAME], glibc.stderr


def test_host_loopback_reaches_a_vm_udp_server_on_both_families(
        hns_sandbox: Sandbox, mvm: SandboxVm, daemon: DaemonProc) -> None:
    serve_udp_peer_echo(mvm, 5454, "dual")
    until(lambda: udp_ask(hns_sandbox.host, "::1", 5454, tries=1) != "",
          "host [::1] to reach the VM's UDP server")
    until(lambda: udp_ask(hns_sandbox.host, "127.0.0.1", 5454, tries=1) != "",
          "host 127.0.0.1 to reach the dual-stack UDP server")
    until(lambda: udp_ask(hns_sandbox.outside, HOST6, 5454, tries=1) != "",
          "the outside to reach it at the host's IPv6 address")


def test_transit_addresses_are_not_reachable_from_the_lan(
        hns_sandbox: Sandbox, mvm: SandboxVm, daemon: DaemonProc) -> None:
    serve(mvm, 8089)
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:8089/", OUTSIDE),
          "the port to be forwarded at the host's address")
    # a LAN peer that routes the transit subnet through the host gets nothing there
    subnet = str(hns_sandbox.service.get_network("M").subnet)
    hns_sandbox.outside.run(["ip", "route", "add", subnet, "via", HOST], check=True)
    result = hns_sandbox.outside.run(["curl", "-sS", "--max-time", "2",
                                      f"http://{mvm.ip}:8089/"])
    assert result.returncode == 28, result        # curl: timed out (dropped, not refused)
    assert reaches(hns_sandbox.outside, f"http://{HOST}:8089/", OUTSIDE)


def test_daemon_restart_serves_again_and_vm_delete_ends_it(
        hns_sandbox: Sandbox, mvm: SandboxVm, daemon: DaemonProc) -> None:
    serve(mvm, 8091)
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:8091/", OUTSIDE), "forwarded")
    assert daemon.stop() == 0
    assert refused(hns_sandbox.outside, f"http://{HOST}:8091/")     # nothing left in nft
    daemon.start()
    until(lambda: reaches(hns_sandbox.outside, f"http://{HOST}:8091/", OUTSIDE),
          "forwarded again by the new daemon")
    until(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8091/"), "host loopback too")
    assert hns_sandbox.hnsctl("vm", "delete", "box").returncode == 0
    table = f"inet hns-{hns_sandbox.service.instance}-mirror"
    until(lambda: table not in hns_sandbox.host.run(["nft", "list", "tables"]).stdout,
          "the inbound table to go with the last mirrored VM")
    assert refused(hns_sandbox.host, "http://127.0.0.1:8091/")
    assert daemon.status()["Mirrored"] == []


# Listens on 0.0.0.0:argv[1], accepts one connection, closes the listener and echoes
# the connection's lines until its end.
ACCEPT_ONE_THEN_ECHO = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[1])))
listener.listen()
conn, _ = listener.accept()
listener.close()
for line in conn.makefile("rb"):
    conn.sendall(line)
conn.close()
"""


def host_can_bind(peer: Peer, port: int) -> bool:
    with peer.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_a_port_stays_the_vms_while_a_connection_it_accepted_lives(
        hns_sandbox: Sandbox, mvm: SandboxVm, daemon: DaemonProc) -> None:
    port = 8092
    server = mvm.popen([sys.executable, "-c", ACCEPT_ONE_THEN_ECHO, str(port)])
    wait_listening(mvm, port)
    until(lambda: state_of(daemon, "box", port) == "forwarding", "the port to be forwarded")
    with hns_sandbox.host.socket() as client:
        client.settimeout(30)                     # a safety net, not a measurement
        client.connect(("127.0.0.1", port))        # the host loopback relay into the VM
        reader = client.makefile("rb")
        client.sendall(b"first\n")
        assert reader.readline() == b"first\n"
        until(lambda: not mvm.run(["ss", "-Hlnt", f"sport = :{port}"]).stdout.strip(),
              "the VM's listener to close")
        until(lambda: state_of(daemon, "box", port) == "forwarding (draining: 1 connection)",
              "the status to show the key draining")
        for _ in range(5):                         # several polls later: still the VM's
            client.sendall(b"again\n")
            assert reader.readline() == b"again\n"
            assert not host_can_bind(hns_sandbox.host, port)
        assert state_of(daemon, "box", port) == "forwarding (draining: 1 connection)"
        reader.close()
    server.communicate(timeout=30)                 # the server saw the end and exited
    until(lambda: state_of(daemon, "box", port) is None, "the key to be released")
    until(lambda: host_can_bind(hns_sandbox.host, port), "the port to be the host's again")
