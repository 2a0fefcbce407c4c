"""Mirrored networks without the daemon: the VM wears the host's addresses and routes, its
traffic leaves from the host's address (real clients: curl, socat, ping, dig), a NAT
network beside it keeps working, bad input changes nothing, delete leaves nothing behind
and restore rebuilds a VM whose namespace went away.

Inbound forwarding, loopback sharing and address tracking need the daemon: not here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

import pytest
from helpers.nsutil import (
    HTTP_PEER_ECHO,
    bad_input_failures,
    serve_http_peer_echo,
    serve_udp_peer_echo,
    snapshot,
    udp_ask,
    wait_listening,
)

from hns import naming
from hns.testing import Sandbox, SandboxVm

TRANSIT_POOL = IPv4Network("169.254.0.0/16")


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def ip_json(peer: Any, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(ok(peer.run(["ip", "-j", *args])) or "[]"))


def show(sandbox: Sandbox, kind: str, name: str) -> dict[str, Any]:
    return dict(json.loads(ok(sandbox.hnsctl("--json", kind, "show", name))))


def eth0_addresses(vm: Any) -> dict[str, dict[str, Any]]:
    """``address/prefixlen`` -> the addr_info entry, for eth0's global addresses."""
    (link,) = ip_json(vm, "addr", "show", "dev", "eth0")
    return {f"{a['local']}/{a['prefixlen']}": a for a in link["addr_info"]
            if a["scope"] == "global"}


def transit6(sandbox: Sandbox, vm: SandboxVm) -> IPv6Address:
    """``fd68:6e73:<instance>:<k>::N`` (k: third octet of the transit /24, N: the VM's
    host part), computed here rather than by hns's own function."""
    k, n = (int(x) for x in vm.ip.split(".")[2:])
    prefix = IPv6Network(f"fd68:6e73:{sandbox.service.instance}:{k:x}::/64")
    return prefix.network_address + n


def peer_addr(text: str) -> str:
    """socat's ``$SOCAT_PEERADDR`` of an IPv6 peer (``[2001:0db8:...]``), compressed."""
    return str(ip_address(text.strip().strip("[]")))


def serve_http6_peer_echo(peer: Any, address: str, port: int) -> subprocess.Popen[Any]:
    proc = peer.popen(["socat", f"TCP6-LISTEN:{port},bind=[{address}],reuseaddr,fork",
                       f"SYSTEM:{HTTP_PEER_ECHO}"])
    wait_listening(peer, port)
    return proc


def curl(peer: Any, url: str) -> subprocess.CompletedProcess[str]:
    return peer.run(["curl", "-sS", "-g", "--max-time", "10", url])  # type: ignore[no-any-return]


def netns_list() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout.split()


def tagged_links(sandbox: Sandbox) -> list[str]:
    """Links of the host namespace whose alias carries this instance's ID."""
    tag = naming.link_alias(sandbox.service.instance_id, "")
    return [link["ifname"] for link in ip_json(sandbox.host, "-d", "link")
            if str(link.get("ifalias", "")).startswith(tag)]


@pytest.fixture
def mirrored_network(hns_sandbox: Sandbox) -> Any:
    return hns_sandbox.service.create_network("m", "mirrored")


@pytest.fixture
def mirrored_vm(make_vm: Callable[..., SandboxVm], mirrored_network: Any) -> SandboxVm:
    return make_vm("box", network=mirrored_network.name)


# --- the VM's view of itself --------------------------------------------------------------

def test_vm_carries_the_host_addresses_beside_its_transit_ones(
        hns_sandbox: Sandbox, mirrored_network: Any, mirrored_vm: SandboxVm) -> None:
    assert IPv4Address(mirrored_vm.ip) in IPv4Network(str(mirrored_network.subnet))
    assert IPv4Network(str(mirrored_network.subnet)).subnet_of(TRANSIT_POOL)
    assert mirrored_network.subnet.prefixlen == 24
    addrs = eth0_addresses(mirrored_vm)
    mirrored = {f"{hns_sandbox.uplink_ip}/24", f"{hns_sandbox.uplink_ip6}/64"}
    transit = {f"{mirrored_vm.ip}/24", f"{transit6(hns_sandbox, mirrored_vm)}/64"}
    assert set(addrs) == mirrored | transit
    for key in mirrored:
        assert addrs[key].get("noprefixroute") is True, addrs[key]
    for key in transit:
        assert not addrs[key].get("noprefixroute"), addrs[key]
    # the same as the host's own global addresses (hns's bridge left out)
    (up0,) = ip_json(hns_sandbox.host, "addr", "show", "dev", "up0")
    host = {f"{a['local']}/{a['prefixlen']}" for a in up0["addr_info"] if a["scope"] == "global"}
    assert host == mirrored
    text = ok(mirrored_vm.run(["ip", "-6", "addr", "show", "dev", "eth0"]))
    assert f"inet6 {hns_sandbox.uplink_ip6}/64 scope global" in text


def test_vm_has_the_host_routes_with_the_host_address_as_source(
        hns_sandbox: Sandbox, mirrored_vm: SandboxVm) -> None:
    gateway4 = mirrored_vm.gateway
    gateway6 = str(transit6(hns_sandbox, mirrored_vm) - int(mirrored_vm.ip.split(".")[3]) + 1)
    routes4 = {r["dst"]: r for r in ip_json(mirrored_vm, "-4", "route")}
    transit_net = str(IPv4Network(f"{mirrored_vm.ip}/24", strict=False))
    assert set(routes4) == {"default", "198.51.100.0/24", transit_net}
    for dst in ("default", "198.51.100.0/24"):
        assert routes4[dst]["gateway"] == gateway4, routes4[dst]
        assert routes4[dst]["prefsrc"] == hns_sandbox.uplink_ip, routes4[dst]
    routes6 = {r["dst"]: r for r in ip_json(mirrored_vm, "-6", "route")}
    for dst in ("default", "2001:db8:100::/64"):
        assert routes6[dst]["gateway"] == gateway6, routes6[dst]
        assert routes6[dst]["prefsrc"] == hns_sandbox.uplink_ip6, routes6[dst]
    (got,) = ip_json(mirrored_vm, "route", "get", hns_sandbox.outside_ip)
    assert got["prefsrc"] == hns_sandbox.uplink_ip and got["gateway"] == gateway4
    (got6,) = ip_json(mirrored_vm, "-6", "route", "get", hns_sandbox.outside_ip6)
    assert got6["prefsrc"] == hns_sandbox.uplink_ip6


def test_an_application_sees_the_host_address_as_its_own(
        hns_sandbox: Sandbox, mirrored_vm: SandboxVm) -> None:
    for family, peer, own in ((socket.AF_INET, hns_sandbox.outside_ip, hns_sandbox.uplink_ip),
                              (socket.AF_INET6, hns_sandbox.outside_ip6,
                               hns_sandbox.uplink_ip6)):
        with mirrored_vm.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((peer, 9))  # no packet: the kernel only picks the source
            assert sock.getsockname()[0] == own


def test_every_global_address_of_the_host_is_mirrored(hns_sandbox: Sandbox,
                                                      mirrored_network: Any,
                                                      make_vm: Callable[..., SandboxVm]) -> None:
    host = hns_sandbox.host
    ok(host.run(["ip", "link", "add", "lan0", "type", "veth", "peer", "lan0p"]))
    ok(host.run(["ip", "link", "set", "lan0p", "up"]))
    ok(host.run(["ip", "addr", "add", "192.0.2.2/24", "dev", "lan0"]))
    ok(host.run(["ip", "addr", "add", "2001:db8:2::2/64", "dev", "lan0", "nodad"]))
    ok(host.run(["ip", "link", "set", "lan0", "up"]))
    vm = make_vm("box", network="m")
    addrs = eth0_addresses(vm)
    for key in ("192.0.2.2/24", "2001:db8:2::2/64", f"{hns_sandbox.uplink_ip}/24"):
        assert addrs.get(key, {}).get("noprefixroute") is True, (key, addrs)
    routes = {r["dst"]: r for r in ip_json(vm, "-4", "route")}
    assert routes["192.0.2.0/24"]["gateway"] == vm.gateway
    # the primary address is the one on the interface of the default route
    assert routes["192.0.2.0/24"]["prefsrc"] == hns_sandbox.uplink_ip
    assert routes["default"]["prefsrc"] == hns_sandbox.uplink_ip
    assert "2001:db8:2::/64" in {r["dst"] for r in ip_json(vm, "-6", "route")}


def test_host_forwards_ipv6_and_keeps_accepting_router_advertisements(
        hns_sandbox: Sandbox) -> None:
    host = hns_sandbox.host
    ok(host.run(["sysctl", "-qw", "net.ipv6.conf.up0.accept_ra=1"]))
    hns_sandbox.service.create_network("m", "mirrored")
    assert ok(host.run(["sysctl", "-n", "net.ipv6.conf.all.forwarding"])).strip() == "1"
    assert ok(host.run(["sysctl", "-n", "net.ipv6.conf.up0.accept_ra"])).strip() == "2"


def test_vm_sysctls_as_wsl_sets_them(mirrored_vm: SandboxVm) -> None:
    values = ok(mirrored_vm.run(["sysctl", "-n", "net.ipv4.conf.all.rp_filter",
                                 "net.ipv4.conf.eth0.rp_filter",
                                 "net.ipv4.conf.eth0.accept_local"])).split()
    assert values == ["0", "0", "1"]


def test_two_mirrored_vms_reach_the_outside_at_once(hns_sandbox: Sandbox,
                                                    mirrored_network: Any,
                                                    make_vm: Callable[..., SandboxVm]) -> None:
    a, b = make_vm("a", network="m"), make_vm("b", network="m")
    assert a.ip != b.ip
    serve_http_peer_echo(hns_sandbox.outside, 8080)
    # the same source port in both VMs: the host's masquerade must tell them apart
    procs = [vm.popen(["curl", "-sS", "--max-time", "10", "--local-port", "40111",
                       f"http://{hns_sandbox.outside_ip}:8080/"]) for vm in (a, b)]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == hns_sandbox.uplink_ip


# --- traffic to the outside ---------------------------------------------------------------

def test_tcp_to_outside_leaves_from_the_host_address(hns_sandbox: Sandbox,
                                                     mirrored_vm: SandboxVm) -> None:
    serve_http_peer_echo(hns_sandbox.outside, 8080)
    result = curl(mirrored_vm, f"http://{hns_sandbox.outside_ip}:8080/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hns_sandbox.uplink_ip


def test_udp_to_outside_leaves_from_the_host_address(hns_sandbox: Sandbox,
                                                     mirrored_vm: SandboxVm) -> None:
    serve_udp_peer_echo(hns_sandbox.outside, 9053)
    seen = udp_ask(mirrored_vm, hns_sandbox.outside_ip, 9053)
    assert seen.split(":")[0] == hns_sandbox.uplink_ip


def test_ipv6_tcp_to_outside_leaves_from_the_host_address(hns_sandbox: Sandbox,
                                                          mirrored_vm: SandboxVm) -> None:
    serve_http6_peer_echo(hns_sandbox.outside, hns_sandbox.outside_ip6, 8086)
    result = curl(mirrored_vm, f"http://[{hns_sandbox.outside_ip6}]:8086/")
    assert result.returncode == 0, result.stderr
    assert peer_addr(result.stdout) == hns_sandbox.uplink_ip6


def test_ipv6_udp_to_outside_leaves_from_the_host_address(hns_sandbox: Sandbox,
                                                          mirrored_vm: SandboxVm) -> None:
    serve_udp_peer_echo(hns_sandbox.outside, 9054, "dual")
    seen = udp_ask(mirrored_vm, hns_sandbox.outside_ip6, 9054)
    assert peer_addr(seen) == hns_sandbox.uplink_ip6


def test_ping_to_outside_both_families(hns_sandbox: Sandbox, mirrored_vm: SandboxVm) -> None:
    # the outside has no route to the transit addresses: a reply proves the translation
    for argv in (["ping", "-c", "2", "-W", "5", hns_sandbox.outside_ip],
                 ["ping", "-6", "-c", "2", "-W", "5", hns_sandbox.outside_ip6]):
        result = mirrored_vm.run(argv)
        assert result.returncode == 0, result.stdout + result.stderr
        assert " 0% packet loss" in result.stdout
    routes = ok(hns_sandbox.outside.run(["ip", "route"])) + ok(
        hns_sandbox.outside.run(["ip", "-6", "route"]))
    assert "169.254." not in routes and "fd68:" not in routes


def test_dns_query_to_an_outside_resolver(hns_sandbox: Sandbox, mirrored_vm: SandboxVm) -> None:
    server = hns_sandbox.outside.popen([
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        f"--listen-address={hns_sandbox.outside_ip}", "--bind-interfaces", "--pid-file=",
        "--log-queries", "--log-facility=-", "--address=/example.test/198.51.100.80"])
    wait_listening(hns_sandbox.outside, 53, udp=True)
    result = mirrored_vm.run(["dig", "+short", "+time=5", "+tries=2",
                              f"@{hns_sandbox.outside_ip}", "example.test", "A"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "198.51.100.80"
    server.terminate()
    _, log = server.communicate(timeout=30)
    assert f"query[A] example.test from {hns_sandbox.uplink_ip}" in log, log


def test_mirrored_vm_beside_a_nat_vm(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                     mirrored_vm: SandboxVm) -> None:
    serve_http_peer_echo(hns_sandbox.outside, 8080)
    serve_udp_peer_echo(hns_sandbox.outside, 9053)
    for vm in (nat_vm, mirrored_vm):
        result = curl(vm, f"http://{hns_sandbox.outside_ip}:8080/")
        assert result.returncode == 0, f"{vm.name}: {result.stderr}"
        assert result.stdout.strip() == hns_sandbox.uplink_ip, vm.name
        assert udp_ask(vm, hns_sandbox.outside_ip, 9053).split(":")[0] == hns_sandbox.uplink_ip
    # the NAT VM keeps its own address (it is masqueraded, not mirrored)
    nat_addrs = eth0_addresses(nat_vm)
    assert set(nat_addrs) == {f"{nat_vm.ip}/{nat_vm.info.prefixlen}"}
    # and the mirrored VM has no address of the NAT network
    assert not any(a.startswith(nat_vm.ip.rsplit(".", 1)[0]) for a in
                   eth0_addresses(mirrored_vm))


# --- the CLI ------------------------------------------------------------------------------

def test_network_show_json_of_a_mirrored_network(hns_sandbox: Sandbox) -> None:
    created = json.loads(ok(hns_sandbox.hnsctl(
        "--json", "network", "create", "m", "--type", "mirrored",
        "--ignored-ports", "8000-8002, 22", "--host-address-loopback", "on")))
    shown = show(hns_sandbox, "network", "m")
    assert created == shown
    assert shown["Type"] == "Mirrored"
    assert shown["IgnoredPorts"] == [22, 8000, 8001, 8002]
    assert shown["HostAddressLoopback"] is True
    assert shown["LocalhostForwarding"] is False
    subnet = IPv4Network(shown["Subnet"])
    assert subnet.subnet_of(TRANSIT_POOL) and subnet.prefixlen == 24
    assert shown["Gateway"] == str(subnet.network_address + 1)
    assert shown["Bridge"] in ok(hns_sandbox.host.run(["ip", "-o", "link"]))
    ok(hns_sandbox.hnsctl("network", "create", "plain", "--type", "mirrored"))
    plain = show(hns_sandbox, "network", "plain")
    assert plain["IgnoredPorts"] == [] and plain["HostAddressLoopback"] is False
    assert IPv4Network(plain["Subnet"]) != subnet  # a transit /24 of its own
    assert IPv4Network(plain["Subnet"]).subnet_of(TRANSIT_POOL)


def test_a_mirrored_network_created_again_gets_the_same_transit_subnet(
        hns_sandbox: Sandbox) -> None:
    ok(hns_sandbox.hnsctl("network", "create", "other", "--type", "mirrored"))
    ok(hns_sandbox.hnsctl("network", "create", "m", "--type", "mirrored"))
    subnet = show(hns_sandbox, "network", "m")["Subnet"]
    ok(hns_sandbox.hnsctl("network", "delete", "m"))
    ok(hns_sandbox.hnsctl("network", "delete", "other"))
    ok(hns_sandbox.hnsctl("network", "create", "m", "--type", "mirrored"))
    assert show(hns_sandbox, "network", "m")["Subnet"] == subnet


def test_a_host_link_local_route_does_not_block_a_mirrored_network(
        hns_sandbox: Sandbox) -> None:
    ok(hns_sandbox.host.run(["ip", "route", "add", "169.254.0.0/16", "dev", "up0", "scope",
                             "link", "metric", "1000"]))
    result = hns_sandbox.hnsctl("network", "create", "m", "--type", "mirrored")
    assert result.returncode == 0, result.stderr
    vm = hns_sandbox.vm("box", "m")
    serve_http_peer_echo(hns_sandbox.outside, 8080)
    answer = curl(vm, f"http://{hns_sandbox.outside_ip}:8080/")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == hns_sandbox.uplink_ip


def test_a_nat_network_shows_no_mirrored_fields(hns_sandbox: Sandbox) -> None:
    ok(hns_sandbox.hnsctl("network", "create", "n", "--type", "nat"))
    shown = show(hns_sandbox, "network", "n")
    assert shown["Type"] == "NAT"
    assert "IgnoredPorts" not in shown and "HostAddressLoopback" not in shown


def test_network_list_and_vm_show(hns_sandbox: Sandbox, nat_network: Any,
                                  mirrored_vm: SandboxVm) -> None:
    listed = {n["Name"]: n for n in json.loads(ok(hns_sandbox.hnsctl("--json", "network",
                                                                    "list")))}
    assert listed["m"]["Type"] == "Mirrored" and listed["nat"]["Type"] == "NAT"
    assert listed["m"] == show(hns_sandbox, "network", "m")
    rows = [line.split() for line in ok(hns_sandbox.hnsctl("network", "list")).splitlines()]
    assert rows[0][:2] == ["NAME", "TYPE"]
    assert ["m", "Mirrored", listed["m"]["Subnet"]] in [r[:3] for r in rows]
    vm = show(hns_sandbox, "vm", "box")
    assert vm["Network"] == "m" and vm["IpAddress"] == mirrored_vm.ip
    assert vm["PrefixLength"] == 24 and vm["Gateway"] == listed["m"]["Gateway"]


BAD_MIRRORED = [
    ("network", "create", "m2", "--type", "mirrored", "--subnet", "10.50.0.0/24"),
    ("network", "create", "m2", "--type", "mirrored", "--gateway", "10.50.0.1"),
    ("network", "create", "n2", "--type", "nat", "--ignored-ports", "22"),
    ("network", "create", "n2", "--type", "nat", "--host-address-loopback", "on"),
    ("network", "create", "m2", "--type", "mirrored", "--ignored-ports", "0"),
    ("network", "create", "m2", "--type", "mirrored", "--ignored-ports", "70000"),
    ("network", "create", "m2", "--type", "mirrored", "--ignored-ports", "a"),
    ("network", "create", "m2", "--type", "mirrored", "--ignored-ports", "22,"),
    ("network", "create", "m2", "--type", "mirrored", "--ignored-ports", "10-5"),
    ("network", "create", "m2", "--type", "mirrored", "--ignored-ports", "1-5000"),
    ("network", "create", "m2", "--type", "mirrored", "--host-address-loopback", "maybe"),
    ("network", "create", "m2", "--type", "mirror"),
    ("network", "create", "m", "--type", "mirrored"),
    ("vm", "create", "v2", "--network", "m", "--ip", "198.51.100.7"),
    ("vm", "create", "v2", "--network", "m", "--ip", "169.254.200.7"),
]


def test_bad_input_exits_2_with_one_line_and_changes_nothing(
        hns_sandbox: Sandbox, mirrored_vm: SandboxVm, nat_network: Any) -> None:
    before = snapshot(hns_sandbox)
    assert bad_input_failures(hns_sandbox, BAD_MIRRORED) == []
    assert snapshot(hns_sandbox) == before


# --- delete and restore -------------------------------------------------------------------

def test_vm_delete_and_network_delete_leave_nothing(hns_sandbox: Sandbox,
                                                    mirrored_vm: SandboxVm) -> None:
    svc = hns_sandbox.service
    table = naming.nft_table_name(svc.instance)
    net = svc.get_network("m")
    assert mirrored_vm.netns in netns_list()
    assert sorted(tagged_links(hns_sandbox)) == sorted([net.bridge, mirrored_vm.info.host_ifname])
    assert ok(hns_sandbox.hnsctl("gc", "--dry-run")) == ""  # nothing of it looks orphaned
    ok(hns_sandbox.hnsctl("vm", "delete", "box"))
    assert mirrored_vm.netns not in netns_list()
    assert not os.path.exists(os.path.join("/etc/netns", mirrored_vm.netns))
    assert tagged_links(hns_sandbox) == [net.bridge]
    assert svc.list_vms() == []
    ok(hns_sandbox.hnsctl("network", "delete", "m"))
    assert tagged_links(hns_sandbox) == []
    assert table not in ok(hns_sandbox.host.run(["nft", "list", "tables"]))
    assert svc.list_networks() == []
    assert not any(ns.startswith(naming.netns_prefix(svc.instance)) for ns in netns_list())
    assert ok(hns_sandbox.hnsctl("gc", "--dry-run")) == ""


def test_network_delete_force_beside_a_nat_network(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                                   mirrored_vm: SandboxVm) -> None:
    svc = hns_sandbox.service
    net = svc.get_network("m")
    assert hns_sandbox.hnsctl("network", "delete", "m").returncode == 2  # a VM is attached
    ok(hns_sandbox.hnsctl("network", "delete", "m", "--force"))
    assert mirrored_vm.netns not in netns_list()
    links = tagged_links(hns_sandbox)
    assert net.bridge not in links and mirrored_vm.info.host_ifname not in links
    ruleset = ok(hns_sandbox.host.run(["nft", "list", "table", "inet",
                                       naming.nft_table_name(svc.instance)]))
    assert net.id not in ruleset and str(net.subnet) not in ruleset
    serve_http_peer_echo(hns_sandbox.outside, 8080)
    result = curl(nat_vm, f"http://{hns_sandbox.outside_ip}:8080/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hns_sandbox.uplink_ip


def _assert_mirrored_and_online(sandbox: Sandbox, vm: SandboxVm) -> None:
    addrs = eth0_addresses(vm)
    assert f"{sandbox.uplink_ip}/24" in addrs and f"{sandbox.uplink_ip6}/64" in addrs
    assert f"{vm.ip}/24" in addrs
    (got,) = ip_json(vm, "route", "get", sandbox.outside_ip)
    assert got["prefsrc"] == sandbox.uplink_ip
    assert "hns-mirror" in ok(vm.run(["nft", "list", "tables"]))
    result = curl(vm, f"http://{sandbox.outside_ip}:8080/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == sandbox.uplink_ip
    result6 = curl(vm, f"http://[{sandbox.outside_ip6}]:8086/")
    assert result6.returncode == 0, result6.stderr
    assert peer_addr(result6.stdout) == sandbox.uplink_ip6


def test_restore_rebuilds_a_vm_whose_namespace_went_away(hns_sandbox: Sandbox,
                                                         mirrored_vm: SandboxVm) -> None:
    serve_http_peer_echo(hns_sandbox.outside, 8080)
    serve_http6_peer_echo(hns_sandbox.outside, hns_sandbox.outside_ip6, 8086)
    before = show(hns_sandbox, "vm", "box")
    subprocess.run(["ip", "netns", "del", mirrored_vm.netns], check=True)
    assert hns_sandbox.hnsctl("vm", "exec", "box", "--", "true").returncode == 1
    made = ok(hns_sandbox.hnsctl("restore"))
    assert "vm box" in made
    assert show(hns_sandbox, "vm", "box") == before
    _assert_mirrored_and_online(hns_sandbox, mirrored_vm)


def test_restore_after_a_reboot_and_when_nothing_is_missing(hns_sandbox: Sandbox,
                                                            mirrored_vm: SandboxVm) -> None:
    serve_http_peer_echo(hns_sandbox.outside, 8080)
    serve_http6_peer_echo(hns_sandbox.outside, hns_sandbox.outside_ip6, 8086)
    svc = hns_sandbox.service
    assert ok(hns_sandbox.hnsctl("restore")) == ""  # nothing missing: nothing made
    addrs = ok(mirrored_vm.run(["ip", "-o", "addr", "show", "dev", "eth0"]))
    assert addrs.count(f" {hns_sandbox.uplink_ip}/24 ") == 1
    _assert_mirrored_and_online(hns_sandbox, mirrored_vm)
    # a reboot: every kernel object goes, the state stays
    subprocess.run(["ip", "netns", "del", mirrored_vm.netns], check=True)
    ok(hns_sandbox.host.run(["ip", "link", "del", svc.get_network("m").bridge]))
    ok(hns_sandbox.host.run(["nft", "delete", "table", "inet",
                             naming.nft_table_name(svc.instance)]))
    made = ok(hns_sandbox.hnsctl("restore"))
    assert "bridge" in made and "vm box" in made
    _assert_mirrored_and_online(hns_sandbox, mirrored_vm)
