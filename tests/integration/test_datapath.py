"""The kernel data path (docs/datapath.md) with real clients in a sandbox: the guard of
the fast table against CVE-2020-8558, localhost forwarding through the kernel, and port
proxies served by DNAT.

Crafted packets come from scapy in a child process started inside the sending
namespace (``ip netns exec``), so its interfaces are that namespace's; it opens one
packet socket on the interface, sends every frame on it with ``sendp`` and reads the
answers from the same socket, which was open before the first frame left.  Each batch
ends with a control SYN to a port the host does listen on: its SYN-ACK shows that the
frames went out and were taken in by the host, which handles each frame within the
sending call, in order, so by then an answer to an earlier probe would have come back.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers.nsutil import (
    DaemonProc,
    curl,
    serve,
    serve_http_peer_echo,
    serve_udp_peer_echo,
    stop,
    udp_ask,
    wait_for,
)

from hns.naming import nft_table_name
from hns.testing import Peer, Sandbox, SandboxVm

# -- the fast table, route_localnet, the status ---------------------------------------


def fast_table(sandbox: Sandbox) -> str:
    return f"{nft_table_name(sandbox.service.instance)}-fast"


def fast_table_exists(sandbox: Sandbox) -> bool:
    listed = sandbox.host.run(["nft", "list", "tables", "inet"])
    assert listed.returncode == 0, listed.stderr
    return f"table inet {fast_table(sandbox)}" in listed.stdout.splitlines()


def fast_objects(sandbox: Sandbox, kind: str, name: str) -> list[dict[str, Any]]:
    listed = sandbox.host.run(["nft", "-j", "list", kind, "inet", fast_table(sandbox), name])
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout)["nftables"])


def _joined(part: Any) -> str:
    if isinstance(part, dict) and "concat" in part:
        return " . ".join(str(value) for value in part["concat"])
    return str(part)


def elements(sandbox: Sandbox, name: str) -> list[str]:
    """A map of the fast table as ``key : value`` lines, nft's way (``tcp . 80 : ...``)."""
    found = []
    for obj in fast_objects(sandbox, "map", name):
        for key, value in obj.get("map", {}).get("elem", []):
            found.append(f"{_joined(key)} : {_joined(value)}")
    return sorted(found)


def guard_drops(sandbox: Sandbox, protocol: str = "ip") -> int:
    """The packets counted by the guard's rule for ``ip`` or ``ip6`` destinations."""
    for obj in fast_objects(sandbox, "chain", "guard"):
        exprs = obj.get("rule", {}).get("expr", [])
        if any(e.get("match", {}).get("left", {}).get("payload", {}).get("protocol")
               == protocol for e in exprs):
            return sum(int(e["counter"]["packets"]) for e in exprs if "counter" in e)
    raise AssertionError(f"no {protocol} rule in the guard of {fast_table(sandbox)}")


def route_localnet(sandbox: Sandbox, device: str) -> str:
    read = sandbox.host.run(["cat", f"/proc/sys/net/ipv4/conf/{device}/route_localnet"])
    assert read.returncode == 0, read.stderr
    return str(read.stdout.strip())


def bridge_of(sandbox: Sandbox, vm: SandboxVm) -> str:
    return str(sandbox.service.get_network(vm.info.network).bridge)


def forward(daemon: DaemonProc, vm: SandboxVm, protocol: str, family: str,
            port: int) -> dict[str, Any] | None:
    for row in daemon.status().get("Forwards", []):
        if (row["Vm"], row["Protocol"], row["Family"], row["Port"]) == \
                (vm.name, protocol, family, port):
            return dict(row)
    return None


def wait_forward(daemon: DaemonProc, vm: SandboxVm, protocol: str, family: str, port: int,
                 path: str) -> dict[str, Any]:
    def ready() -> bool:
        row = forward(daemon, vm, protocol, family, port)
        return row is not None and row["State"] == "forwarding" and row.get("Path") == path
    wait_for(ready, f"{protocol} {family} {port} forwarding on the {path} path")
    row = forward(daemon, vm, protocol, family, port)
    assert row is not None
    return row


def proxy_row(daemon: DaemonProc, port: int, protocol: str = "tcp") -> dict[str, Any] | None:
    rows = [r for r in daemon.status().get("Relays", []) if r.get("Kind") == "portproxy"
            and r["Protocol"] == protocol and str(r["Listen"]).endswith(f":{port}")]
    return dict(rows[0]) if rows else None


def wait_proxy(daemon: DaemonProc, port: int, path: str, protocol: str = "tcp"
               ) -> dict[str, Any]:
    def ready() -> bool:
        row = proxy_row(daemon, port, protocol)
        return row is not None and row["State"] == "listening" and row.get("Path") == path
    wait_for(ready, f"the {protocol} proxy on {port} listening on the {path} path")
    row = proxy_row(daemon, port, protocol)
    assert row is not None
    return row


def portproxy(sandbox: Sandbox, *words: str) -> None:
    result = sandbox.hnsctl("portproxy", *words)
    assert result.returncode == 0, result.stderr


def peer_of(text: str) -> str:
    """The client address a peer-echo server answered, IPv4-mapped ones as IPv4."""
    address = ipaddress.ip_address(text.strip().strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def answer(peer: Peer, url: str) -> str:
    result = curl(peer, url)
    assert result.returncode == 0, f"{url}: {result.stderr}"
    return peer_of(result.stdout)


# -- crafted frames -------------------------------------------------------------------

# argv[1]: {"iface", "mac", "probes": [...], "control": {...}, "timeout"}; each probe
# {"proto": "tcp"|"udp", "src", "dst", "sport", "dport"}.  Prints the answers seen (TCP
# or UDP to a probe's source port) and whether the control SYN got its SYN-ACK.
PROBE = r"""
import json, sys
from scapy.all import IP, TCP, UDP, Ether, IPv6, conf, get_if_hwaddr, sendp, sniff
conf.verb = 0
spec = json.loads(sys.argv[1])
# the source MAC is set: scapy would take it from the route to 127.0.0.1 (lo's, all
# zeros), and a bridge drops a frame from an invalid source address
ether = Ether(src=get_if_hwaddr(spec["iface"]), dst=spec["mac"])
control = spec["control"]
ports = {p["sport"] for p in spec["probes"]} | {control["sport"]}

def frame(p):
    net = (IPv6 if ":" in p["dst"] else IP)(src=p["src"], dst=p["dst"])
    if p["proto"] == "tcp":
        return ether / net / TCP(sport=p["sport"], dport=p["dport"], flags="S", seq=1000)
    return ether / net / UDP(sport=p["sport"], dport=p["dport"]) / b"probe"

def l4(pkt):
    return pkt[TCP] if TCP in pkt else pkt[UDP] if UDP in pkt else None

def answers(pkt):
    seg = l4(pkt)
    return seg is not None and seg.dport in ports and not (TCP in pkt and seg.flags == "S")

def is_control(pkt):
    return answers(pkt) and TCP in pkt and pkt[TCP].dport == control["sport"]

sock = conf.L2socket(iface=spec["iface"])
try:
    sendp([frame(p) for p in spec["probes"]] + [frame(control)], socket=sock)
    seen = sniff(opened_socket=sock, timeout=spec["timeout"], lfilter=answers,
                 stop_filter=is_control)
finally:
    sock.close()
rows = [{"src": pkt[IPv6 if IPv6 in pkt else IP].src, "sport": l4(pkt).sport,
         "dport": l4(pkt).dport, "flags": str(l4(pkt).flags) if TCP in pkt else "udp"}
        for pkt in seen]
print(json.dumps({"control": any(r["dport"] == control["sport"] and "S" in r["flags"]
                                 and "A" in r["flags"] for r in rows),
                  "answers": [r for r in rows if r["dport"] != control["sport"]]}))
"""


def link_mac(peer: Peer, ifname: str) -> str:
    shown = peer.run(["ip", "-j", "link", "show", "dev", ifname])
    assert shown.returncode == 0, shown.stderr
    return str(json.loads(shown.stdout)[0]["address"])


def send_probes(peer: Peer, iface: str, mac: str, probes: list[dict[str, Any]],
                control: dict[str, Any]) -> list[dict[str, Any]]:
    """Send ``probes`` then ``control`` as frames to ``mac`` from ``peer``'s ``iface``;
    the answers to the probes (the control's answer is required)."""
    spec = {"iface": iface, "mac": mac, "probes": probes, "control": control, "timeout": 20}
    sent = peer.run([sys.executable, "-c", PROBE, json.dumps(spec)])
    assert sent.returncode == 0, sent.stderr
    seen = json.loads(sent.stdout.strip().splitlines()[-1])
    assert seen["control"], f"the control SYN got no SYN-ACK: {sent.stdout} {sent.stderr}"
    return list(seen["answers"])


def tcp(src: str, dst: str, dport: int, sport: int) -> dict[str, Any]:
    return {"proto": "tcp", "src": src, "dst": dst, "dport": dport, "sport": sport}


def udp(src: str, dst: str, dport: int, sport: int) -> dict[str, Any]:
    return {"proto": "udp", "src": src, "dst": dst, "dport": dport, "sport": sport}


# -- the guard: CVE-2020-8558 ---------------------------------------------------------

SERVICE_PORT = 7070     # the host's own services on 127.0.0.1 and ::1
CONTROL_PORT = 7071     # a host listener on every address: the control SYN's target
FORWARDED = 8080        # a VM's 0.0.0.0 listener, forwarded through the kernel


@dataclass
class HostServices:
    """Sockets of the host namespace on its loopback addresses, and the control one."""

    sockets: list[socket.socket] = field(default_factory=list)

    def open(self, peer: Peer, family: int, kind: int, address: str, port: int) -> None:
        sock = peer.socket(family, kind)
        self.sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(16)
        sock.setblocking(False)

    def arrived(self) -> list[str]:
        """What reached the loopback services: connections accepted, datagrams."""
        got = []
        for sock in self.sockets[1:]:          # [0]: the control listener
            with contextlib.suppress(BlockingIOError):
                if sock.type == socket.SOCK_STREAM:
                    got.append(f"connection from {sock.accept()[1]}")
                else:
                    got.append(f"datagram from {sock.recvfrom(100)[1]}")
        return got


@pytest.fixture
def guarded(hns_sandbox: Sandbox, nat_vm: SandboxVm,
            daemon: DaemonProc) -> Iterator[HostServices]:
    """A kernel localhost forward (so route_localnet is on at the VM's bridge) and the
    host's services on 127.0.0.1 and ::1."""
    services = HostServices()
    try:
        host = hns_sandbox.host
        services.open(host, socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0", CONTROL_PORT)
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                services.open(host, family, kind, address, SERVICE_PORT)
        serve(nat_vm, FORWARDED, "TCP4-LISTEN", "0.0.0.0")
        wait_forward(daemon, nat_vm, "tcp", "ipv4", FORWARDED, "kernel")
        wait_for(lambda: route_localnet(hns_sandbox, bridge_of(hns_sandbox, nat_vm)) == "1",
                 "route_localnet on the VM's bridge")
        # the host knows the senders' MACs: an answer from 127.0.0.1 would leave at once
        # (an ARP request from 127.0.0.1 gets no reply, and the answer would be lost)
        for address in (nat_vm.ip, hns_sandbox.outside_ip, hns_sandbox.outside_ip6):
            pinged = host.run(["ping", "-c", "1", "-W", "5", address])
            assert pinged.returncode == 0, pinged.stdout + pinged.stderr
        yield services
    finally:
        for sock in services.sockets:
            sock.close()


def test_guard_drops_localhost_frames_from_a_vm(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                               guarded: HostServices) -> None:
    src, lo = nat_vm.ip, "127.0.0.1"
    probes = [tcp(src, lo, SERVICE_PORT, 41001), udp(src, lo, SERVICE_PORT, 41002),
              tcp(src, lo, FORWARDED, 41003)]
    before = guard_drops(hns_sandbox)
    mac = link_mac(hns_sandbox.host, bridge_of(hns_sandbox, nat_vm))   # the gateway's
    answers = send_probes(nat_vm, nat_vm.info.interface, mac, probes,
                          tcp(src, nat_vm.gateway, CONTROL_PORT, 41000))
    assert answers == []                                    # no SYN-ACK, nothing at all
    assert guarded.arrived() == []
    assert guard_drops(hns_sandbox) - before == len(probes)


def test_guard_drops_localhost_frames_from_outside(hns_sandbox: Sandbox,
                                                  guarded: HostServices) -> None:
    src, src6 = hns_sandbox.outside_ip, hns_sandbox.outside_ip6
    probes = [tcp(src, "127.0.0.1", SERVICE_PORT, 42001),
              udp(src, "127.0.0.1", SERVICE_PORT, 42002),
              tcp(src, "127.0.0.1", FORWARDED, 42003)]
    probes6 = [tcp(src6, "::1", SERVICE_PORT, 42004), udp(src6, "::1", SERVICE_PORT, 42005)]
    before = guard_drops(hns_sandbox)
    answers = send_probes(hns_sandbox.outside, "out0", link_mac(hns_sandbox.host, "up0"),
                          probes + probes6,
                          tcp(src, hns_sandbox.uplink_ip, CONTROL_PORT, 42000))
    assert answers == []
    assert guarded.arrived() == []
    # ::1 is dropped by the kernel before the hook (ip6_rcv_core), so only the IPv4
    # frames are counted
    assert guard_drops(hns_sandbox) - before == len(probes)
    assert route_localnet(hns_sandbox, "up0") == "0"


# -- localhost forwarding through the kernel ------------------------------------------


def test_localhost_tcp_through_the_kernel(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                         daemon: DaemonProc) -> None:
    serve(nat_vm, 8080, "TCP4-LISTEN", "0.0.0.0")
    wait_forward(daemon, nat_vm, "tcp", "ipv4", 8080, "kernel")
    assert answer(hns_sandbox.host, "http://127.0.0.1:8080/") == nat_vm.gateway
    assert answer(hns_sandbox.host, "http://localhost:8080/") == nat_vm.gateway
    assert route_localnet(hns_sandbox, bridge_of(hns_sandbox, nat_vm)) == "1"
    assert elements(hns_sandbox, "lo4") == [f"tcp . 8080 : {nat_vm.ip} . 8080"]
    row = forward(daemon, nat_vm, "tcp", "ipv4", 8080)
    assert row is not None and row["Accepted"] == 0        # the relay saw none of them


def test_localhost_udp_through_the_kernel(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                         daemon: DaemonProc) -> None:
    serve_udp_peer_echo(nat_vm, 5301, "4")
    wait_forward(daemon, nat_vm, "udp", "ipv4", 5301, "kernel")
    assert peer_of(udp_ask(hns_sandbox.host, "127.0.0.1", 5301)) == nat_vm.gateway
    assert elements(hns_sandbox, "lo4") == [f"udp . 5301 : {nat_vm.ip} . 5301"]
    assert route_localnet(hns_sandbox, bridge_of(hns_sandbox, nat_vm)) == "1"


def test_route_localnet_only_while_a_kernel_forward_exists(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, make_vm: Any, daemon: DaemonProc) -> None:
    hns_sandbox.service.create_network("other", "nat")
    other = make_vm("other0", network="other")
    bridge, other_bridge = bridge_of(hns_sandbox, nat_vm), bridge_of(hns_sandbox, other)
    wait_for(lambda: fast_table_exists(hns_sandbox), "the fast table")
    assert route_localnet(hns_sandbox, bridge) == "0"
    server = serve(nat_vm, 8180, "TCP4-LISTEN", "0.0.0.0")
    wait_forward(daemon, nat_vm, "tcp", "ipv4", 8180, "kernel")
    assert [route_localnet(hns_sandbox, d) for d in (bridge, other_bridge, "up0", "all")] \
        == ["1", "0", "0", "0"]
    stop(server)                                            # the VM's listener goes
    wait_for(lambda: route_localnet(hns_sandbox, bridge) == "0", "route_localnet off")
    wait_for(lambda: elements(hns_sandbox, "lo4") == [], "the lo4 element to go")
    assert forward(daemon, nat_vm, "tcp", "ipv4", 8180) is None
    serve(nat_vm, 8180, "TCP4-LISTEN", "0.0.0.0")
    wait_forward(daemon, nat_vm, "tcp", "ipv4", 8180, "kernel")
    assert route_localnet(hns_sandbox, bridge) == "1"
    assert daemon.stop() == 0                               # the daemon goes
    assert route_localnet(hns_sandbox, bridge) == "0"
    assert not fast_table_exists(hns_sandbox)


def test_dual_stack_listener_keeps_ipv6_on_the_relay(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    serve(nat_vm, 8089, "TCP6-LISTEN", "[::]", extra=",ipv6only=0")
    wait_forward(daemon, nat_vm, "tcp", "ipv4", 8089, "kernel")
    wait_forward(daemon, nat_vm, "tcp", "ipv6", 8089, "relay")
    assert answer(hns_sandbox.host, "http://127.0.0.1:8089/") == nat_vm.gateway
    assert ipaddress.ip_address(answer(hns_sandbox.host, "http://[::1]:8089/")).is_loopback


def test_vm_loopback_listener_stays_on_the_relay(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                                daemon: DaemonProc) -> None:
    serve(nat_vm, 8083, "TCP4-LISTEN", "127.0.0.1")
    wait_forward(daemon, nat_vm, "tcp", "ipv4", 8083, "relay")
    assert answer(hns_sandbox.host, "http://127.0.0.1:8083/") == "127.0.0.1"
    assert elements(hns_sandbox, "lo4") == []
    assert route_localnet(hns_sandbox, bridge_of(hns_sandbox, nat_vm)) == "0"


def test_localhost_path_relay_serves_everything_by_the_relay(
        hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    daemon = DaemonProc(hns_sandbox)
    daemon.start("--localhost-path", "relay")
    try:
        serve(nat_vm, 8080, "TCP4-LISTEN", "0.0.0.0")
        serve_udp_peer_echo(nat_vm, 5301, "4")
        wait_forward(daemon, nat_vm, "tcp", "ipv4", 8080, "relay")
        wait_forward(daemon, nat_vm, "udp", "ipv4", 5301, "relay")
        assert answer(hns_sandbox.host, "http://127.0.0.1:8080/") == "127.0.0.1"
        assert peer_of(udp_ask(hns_sandbox.host, "127.0.0.1", 5301)) == "127.0.0.1"
        assert {row["Path"] for row in daemon.status()["Forwards"]} == {"relay"}
        assert elements(hns_sandbox, "lo4") == []               # the guard's table only
        assert route_localnet(hns_sandbox, bridge_of(hns_sandbox, nat_vm)) == "0"
    finally:
        daemon.kill()


# -- port proxies through the kernel --------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0", "198.51.100.2"], ids=["any", "address"])
def test_proxy_through_the_kernel_keeps_the_client_address(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc, listen: str) -> None:
    serve_http_peer_echo(nat_vm, 9080, bind=nat_vm.ip)     # not forwarded to localhost
    words = ["listenport=8080", f"connectaddress={nat_vm.ip}", "connectport=9080"]
    if listen != "0.0.0.0":
        words.append(f"listenaddress={listen}")
    portproxy(hns_sandbox, "add", "v4tov4", *words)
    wait_proxy(daemon, 8080, "kernel")
    url = f"http://{hns_sandbox.uplink_ip}:8080/"
    assert answer(hns_sandbox.outside, url) == hns_sandbox.outside_ip   # the real client
    row = proxy_row(daemon, 8080)
    assert row is not None and row["Accepted"] == 0        # the relay saw nothing
    name, key = ("px_any", "") if listen == "0.0.0.0" else ("px_addr", f"{listen} . ")
    assert elements(hns_sandbox, name) == [f"{key}tcp . 8080 : {nat_vm.ip} . 9080"]
    if listen == "0.0.0.0":                                 # host loopback: the relay
        assert answer(hns_sandbox.host, "http://127.0.0.1:8080/") == nat_vm.gateway
    portproxy(hns_sandbox, "delete", "v4tov4", *words[:1], *words[3:])
    wait_for(lambda: elements(hns_sandbox, name) == [], "the proxy's element to go")
    assert curl(hns_sandbox.outside, url).returncode != 0
    assert daemon.stop() == 0
    assert not fast_table_exists(hns_sandbox)


def test_udp_proxy_through_the_kernel(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                     daemon: DaemonProc) -> None:
    serve_udp_peer_echo(nat_vm, 5301, "4")
    portproxy(hns_sandbox, "add", "v4tov4", "listenport=5353", f"connectaddress={nat_vm.ip}",
              "connectport=5301", "protocol=udp")
    wait_proxy(daemon, 5353, "kernel", "udp")
    assert peer_of(udp_ask(hns_sandbox.outside, hns_sandbox.uplink_ip, 5353)) == \
        hns_sandbox.outside_ip
    assert elements(hns_sandbox, "px_any") == [f"udp . 5353 : {nat_vm.ip} . 5301"]


def test_proxy_mode_relay_shows_the_host_address(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                                daemon: DaemonProc) -> None:
    serve_http_peer_echo(nat_vm, 9080, bind=nat_vm.ip)
    portproxy(hns_sandbox, "add", "v4tov4", "listenport=8080", f"connectaddress={nat_vm.ip}",
              "connectport=9080", "mode=relay")
    wait_proxy(daemon, 8080, "relay")
    assert answer(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:8080/") == \
        nat_vm.gateway
    assert elements(hns_sandbox, "px_any") == []


def test_v4tov6_proxy_stays_on_the_relay(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                        daemon: DaemonProc) -> None:
    outside6 = hns_sandbox.outside_ip6
    hns_sandbox.outside.popen(["socat", f"TCP6-LISTEN:9443,bind=[{outside6}],reuseaddr,fork",
                               "SYSTEM:sed -n /^.$/q; echo HTTP/1.0 200 OK; echo; "
                               "echo $SOCAT_PEERADDR"])
    wait_for(lambda: bool(hns_sandbox.outside.run(["ss", "-Hlnt", "sport = :9443"])
                          .stdout.strip()), "the outside's v6 server")
    portproxy(hns_sandbox, "add", "v4tov6", "listenport=8443", f"connectaddress={outside6}",
              "connectport=9443")
    wait_proxy(daemon, 8443, "relay")
    assert answer(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:8443/") == \
        hns_sandbox.uplink_ip6                              # the relay dialed from the host
    assert elements(hns_sandbox, "px_any") == elements(hns_sandbox, "px_addr") == []


def test_mode_kernel_the_kernel_cannot_serve_is_refused(hns_sandbox: Sandbox,
                                                       nat_vm: SandboxVm) -> None:
    before = hns_sandbox.hnsctl("--json", "portproxy", "show", "all").stdout
    for words in (("v4tov4", "listenport=8444", f"connectaddress={hns_sandbox.outside_ip}",
                   "mode=kernel"),
                  ("v4tov6", "listenport=8445", f"connectaddress={hns_sandbox.outside_ip6}",
                   "mode=kernel")):
        result = hns_sandbox.hnsctl("portproxy", "add", *words)
        assert result.returncode == 2, (words, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("hnsctl: error:"), result.stderr
    assert hns_sandbox.hnsctl("--json", "portproxy", "show", "all").stdout == before
