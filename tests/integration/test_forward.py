"""Localhost forwarding: servers inside NAT VMs reached at the host's loopback, with real
clients (curl, dig, socat) in the sandbox's host namespace, where the daemon runs."""

from __future__ import annotations

import ipaddress
import json
import sys
from typing import Any

import pytest
from helpers.nsutil import (
    DaemonProc,
    curl,
    reaches,
    refused,
    serve,
    serve_http_peer_echo,
    serve_udp_peer_echo,
    stop,
    udp_ask,
    wait_for,
    wait_listening,
)

from hns.testing import Sandbox, SandboxVm

# Answers every request with a fixed word: tells which VM a connection reached.
HTTP_WORD = "sed -n /^.$/q; echo HTTP/1.0 200 OK; echo; echo {word}"
# ... or with the client's address as the server sees it.


def forwards(daemon: DaemonProc, vm: str | None = None) -> list[dict[str, Any]]:
    return [f for f in daemon.status().get("Forwards", []) if vm is None or f["Vm"] == vm]


def state_of(daemon: DaemonProc, vm: str, protocol: str, family: str, port: int) -> str | None:
    for f in forwards(daemon, vm):
        if (f["Protocol"], f["Family"], f["Port"]) == (protocol, family, port):
            return str(f["State"])
    return None


def is_loopback(text: str) -> bool:
    address = ipaddress.ip_address(text.strip().strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def peer_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text.strip().strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@pytest.mark.parametrize(("listen", "bind", "urls"), [
    ("TCP4-LISTEN", "127.0.0.1", ["http://127.0.0.1:{port}/"]),
    ("TCP4-LISTEN", "0.0.0.0", ["http://127.0.0.1:{port}/", "http://localhost:{port}/"]),
    ("TCP6-LISTEN", "[::]", ["http://[::1]:{port}/", "http://127.0.0.1:{port}/"]),
    ("TCP6-LISTEN", "[::1]", ["http://[::1]:{port}/"]),
], ids=["127.0.0.1", "0.0.0.0", "dual-stack", "::1"])
def test_vm_server_reached_at_host_localhost(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                            daemon: DaemonProc, listen: str, bind: str,
                                            urls: list[str]) -> None:
    port = 8080
    extra = ",ipv6only=0" if bind == "[::]" else ""
    serve(nat_vm, port, listen, bind, extra=extra)
    wildcard = bind in ("0.0.0.0", "[::]")
    for url in (u.format(port=port) for u in urls):
        wait_for(lambda url=url: reaches(hns_sandbox.host, url), f"{url} through the forward")
        seen = curl(hns_sandbox.host, url).stdout
        if wildcard and "[::1]" not in url:     # the kernel path: from the gateway address
            assert peer_of(seen) == ipaddress.ip_address(nat_vm.gateway)
        else:                                    # the relay: a loopback client
            assert is_loopback(seen)
    families = {f["Family"] for f in forwards(daemon, nat_vm.name)}
    assert families == ({"ipv4", "ipv6"} if bind == "[::]" else
                        {"ipv6"} if bind == "[::1]" else {"ipv4"})
    assert all(f["State"] == "forwarding" for f in forwards(daemon))
    assert {(f["Family"], f["Path"]) for f in forwards(daemon)} == {
        (f["Family"], "kernel" if wildcard and f["Family"] == "ipv4" else "relay")
        for f in forwards(daemon)}


def test_only_the_family_the_vm_listens_on(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                          daemon: DaemonProc) -> None:
    serve(nat_vm, 8081, "TCP6-LISTEN", "[::]", extra=",ipv6only=1")
    wait_for(lambda: reaches(hns_sandbox.host, "http://[::1]:8081/"), "the v6 forward")
    assert refused(hns_sandbox.host, "http://127.0.0.1:8081/")   # a v6-only socket


def test_server_on_another_address_is_not_forwarded(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                                   daemon: DaemonProc) -> None:
    serve(nat_vm, 8082, "TCP4-LISTEN", nat_vm.ip)
    serve(nat_vm, 8083, "TCP4-LISTEN", "127.0.0.1")
    wait_for(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8083/"), "the 8083 forward")
    assert refused(hns_sandbox.host, "http://127.0.0.1:8082/")
    assert [f["Port"] for f in forwards(daemon)] == [8083]


def test_udp_dns_through_the_forward(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                     daemon: DaemonProc) -> None:
    nat_vm.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=",
                  "--port=5300", "--listen-address=127.0.0.1", "--bind-interfaces",
                  "--no-resolv", "--no-hosts", "--address=/forward.test/192.0.2.7"])
    wait_listening(nat_vm, 5300, udp=True)
    wait_for(lambda: state_of(daemon, nat_vm.name, "udp", "ipv4", 5300) == "forwarding",
             "the UDP forward")
    for transport in ("+notcp", "+tcp"):      # dnsmasq also listens on TCP 5300
        result = hns_sandbox.host.run(["dig", "@127.0.0.1", "-p", "5300", "+short", "+tries=3",
                                       "+time=2", transport, "forward.test"])
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "192.0.2.7"


def test_udp_echo_dual_stack(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                             daemon: DaemonProc) -> None:
    serve_udp_peer_echo(nat_vm, 5301, "dual")
    for host in ("127.0.0.1", "::1"):
        wait_for(lambda host=host: udp_ask(hns_sandbox.host, host, 5301, tries=1) != "",
                 f"the UDP forward on {host}")
        seen = udp_ask(hns_sandbox.host, host, 5301)
        if host == "127.0.0.1":       # the kernel path: from the gateway address
            assert peer_of(seen) == ipaddress.ip_address(nat_vm.gateway)
        else:                         # the relay: a loopback client
            assert is_loopback(seen)


def test_server_stops_then_host_port_refuses(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                             daemon: DaemonProc) -> None:
    proc = serve(nat_vm, 8084, "TCP4-LISTEN", "0.0.0.0")
    wait_for(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8084/"), "the forward")
    stop(proc)
    wait_for(lambda: refused(hns_sandbox.host, "http://127.0.0.1:8084/"), "the port to close")
    assert forwards(daemon) == []


def test_busy_host_port_is_reported_then_taken_when_free(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    squatter = hns_sandbox.host.popen(["socat", "TCP4-LISTEN:8085,bind=127.0.0.1,reuseaddr",
                                       "SYSTEM:echo squatter"])
    wait_listening(hns_sandbox.host, 8085)
    serve(nat_vm, 8085, "TCP4-LISTEN", "0.0.0.0", answer=HTTP_WORD.format(word="vm0"))
    wait_for(lambda: (state_of(daemon, nat_vm.name, "tcp", "ipv4", 8085) or "")
             .startswith("conflict: host port"), "the conflict to show")
    stop(squatter)
    wait_for(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8085/", "vm0"),
             "the forward once the port is free")
    assert state_of(daemon, nat_vm.name, "tcp", "ipv4", 8085) == "forwarding"


def test_two_vms_on_one_port_first_wins(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                        make_vm: Any, daemon: DaemonProc) -> None:
    second = make_vm()
    url = "http://127.0.0.1:8086/"
    first_server = serve(nat_vm, 8086, answer=HTTP_WORD.format(word=nat_vm.name))
    wait_for(lambda: reaches(hns_sandbox.host, url, nat_vm.name), "the first VM's forward")
    serve(second, 8086, answer=HTTP_WORD.format(word=second.name))
    wait_for(lambda: state_of(daemon, second.name, "tcp", "ipv4", 8086)
             == f"conflict: held by vm {nat_vm.name}", "the conflict to show")
    assert reaches(hns_sandbox.host, url, nat_vm.name)
    stop(first_server)                                  # the other VM takes over
    wait_for(lambda: reaches(hns_sandbox.host, url, second.name), "the second VM's forward")


def test_network_with_forwarding_off(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                     daemon: DaemonProc) -> None:
    made = hns_sandbox.hnsctl("--json", "network", "create", "quiet", "--type", "nat",
                              "--localhost-forwarding", "off")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["LocalhostForwarding"] is False
    quiet = hns_sandbox.vm("quiet0", "quiet")
    serve(quiet, 8087, "TCP4-LISTEN", "0.0.0.0")
    serve(nat_vm, 8088, "TCP4-LISTEN", "0.0.0.0")      # the daemon watches this one
    wait_for(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8088/"), "the other forward")
    assert refused(hns_sandbox.host, "http://127.0.0.1:8087/")
    assert forwards(daemon, "quiet0") == []


def test_never_exposed_beyond_host_loopback(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                           daemon: DaemonProc) -> None:
    serve(nat_vm, 8089, "TCP6-LISTEN", "[::]", extra=",ipv6only=0")
    wait_for(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8089/"), "the forward")
    wait_for(lambda: reaches(hns_sandbox.host, "http://[::1]:8089/"), "the v6 forward")
    for url in (f"http://{hns_sandbox.uplink_ip}:8089/", f"http://[{hns_sandbox.uplink_ip6}]:8089/"):
        assert refused(hns_sandbox.outside, url)
        assert refused(hns_sandbox.host, url)
    listeners = hns_sandbox.host.run(["ss", "-Hlnt", "sport = :8089"]).stdout.split()
    assert sorted(w for w in listeners if w.endswith(":8089")) == ["127.0.0.1:8089", "[::1]:8089"]


def test_vm_delete_ends_its_forwards(hns_sandbox: Sandbox, make_vm: Any,
                                     daemon: DaemonProc) -> None:
    vm = make_vm()
    serve(vm, 8090)
    wait_for(lambda: reaches(hns_sandbox.host, "http://127.0.0.1:8090/"), "the forward")
    assert hns_sandbox.hnsctl("vm", "delete", vm.name).returncode == 0
    assert refused(hns_sandbox.host, "http://127.0.0.1:8090/")   # the CLI told the daemon
    assert forwards(daemon) == []


def test_a_static_port_proxy_on_the_port_wins(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                             make_vm: Any, daemon: DaemonProc) -> None:
    other = make_vm()
    serve(other, 9091, "TCP4-LISTEN", other.ip, answer=HTTP_WORD.format(word="proxied"))
    serve(nat_vm, 8091, "TCP4-LISTEN", "0.0.0.0", answer=HTTP_WORD.format(word="forwarded"))
    url = "http://127.0.0.1:8091/"
    wait_for(lambda: reaches(hns_sandbox.host, url, "forwarded"), "the forward")
    added = hns_sandbox.hnsctl("portproxy", "add", "v4tov4", "listenport=8091",
                               f"connectaddress={other.ip}", "connectport=9091")
    assert added.returncode == 0, added.stderr
    # the forward gives the port up at once and the proxy takes it (no retry needed)
    assert reaches(hns_sandbox.host, url, "proxied")
    assert state_of(daemon, nat_vm.name, "tcp", "ipv4", 8091) == \
        "conflict: reserved by portproxy v4tov4 tcp 0.0.0.0:8091"
    removed = hns_sandbox.hnsctl("portproxy", "delete", "v4tov4", "listenport=8091")
    assert removed.returncode == 0, removed.stderr
    wait_for(lambda: reaches(hns_sandbox.host, url, "forwarded"), "the forward to come back")


# Binds TCP listeners on 0.0.0.0 to the ports of argv[1:] and sleeps.
LISTEN_ON_PORTS = """
import socket, sys, time
held = []
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen()
    held.append(s)
time.sleep(1e6)
"""


def test_forwards_take_at_most_half_of_the_host_ephemeral_range(
        hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    # the sandbox's host namespace, never the real host's
    hns_sandbox.host.run(["sysctl", "-w", "net.ipv4.ip_local_port_range=40000 40009"],
                         check=True)
    daemon = DaemonProc(hns_sandbox)
    daemon.start()
    try:
        ports = list(range(40000, 40010))
        nat_vm.popen([sys.executable, "-c", LISTEN_ON_PORTS, *map(str, ports)])
        for port in ports:
            wait_listening(nat_vm, port)
        capped = "conflict: over the ephemeral cap (half of the host's 40000-40009)"

        def states() -> dict[int, str]:
            return {f["Port"]: f["State"] for f in forwards(daemon, nat_vm.name)}
        wait_for(lambda: sorted(states().values()) == [capped] * 5 + ["forwarding"] * 5,
                 "five forwards and five conflicts")
        assert [p for p, s in sorted(states().items()) if s == "forwarding"] == ports[:5]
        held = hns_sandbox.host.run(["ss", "-Hlnt", "sport >= :40000"]).stdout
        assert sorted(w for w in held.split() if w.startswith("127.0.0.1:")) == [
            f"127.0.0.1:{p}" for p in ports[:5]]
        # the host can still open outgoing connections: ephemeral ports remain
        serve_http_peer_echo(hns_sandbox.outside, 8000)
        assert reaches(hns_sandbox.host, f"http://{hns_sandbox.outside_ip}:8000/",
                       hns_sandbox.uplink_ip)
    finally:
        daemon.kill()
