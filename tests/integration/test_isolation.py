"""Isolation (WSL's firewall): nothing unsolicited reaches a VM, networks do not reach
each other, and the gateway keeps its MAC whatever VMs come and go.

The outside peer here is given what an attacker on the LAN would configure: a route to
the VM subnet through the host's uplink address.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from helpers.nsutil import serve_http_peer_echo, wait_listening

from hns.testing import Sandbox, SandboxVm


def route_subnet_through_host(sandbox: Sandbox, subnet: str) -> None:
    result = sandbox.outside.run(["ip", "route", "replace", subnet, "via", sandbox.uplink_ip])
    assert result.returncode == 0, result.stderr


def curl(peer: Any, url: str, timeout: int = 3) -> Any:
    return peer.run(["curl", "-sS", "--max-time", str(timeout), url])


def test_outside_with_a_route_reaches_no_vm_without_a_mapping(
        hns_sandbox: Sandbox, nat_network: Any, nat_vm: SandboxVm) -> None:
    route_subnet_through_host(hns_sandbox, str(nat_network.subnet))
    serve_http_peer_echo(nat_vm, 7000)
    wait_listening(nat_vm, 7000)
    assert curl(hns_sandbox.outside, f"http://{nat_vm.ip}:7000/").returncode != 0
    ping = hns_sandbox.outside.run(["ping", "-c", "2", "-W", "1", nat_vm.ip])
    assert ping.returncode != 0, ping.stdout
    # UDP: nothing arrives either (the VM's socket would answer with its peer address)
    udp = hns_sandbox.outside.run(["socat", "-T", "2", "-", f"UDP:{nat_vm.ip}:7001"],
                                  input="x", capture_output=True, text=True)
    assert udp.stdout == ""
    # the host itself still reaches the VM (WSL's host does), and so does its gateway
    assert curl(hns_sandbox.host, f"http://{nat_vm.ip}:7000/").stdout.strip() == nat_vm.gateway


def test_a_mapped_port_is_reached_from_outside_with_the_client_address(
        hns_sandbox: Sandbox, nat_network: Any, nat_vm: SandboxVm) -> None:
    route_subnet_through_host(hns_sandbox, str(nat_network.subnet))
    serve_http_peer_echo(nat_vm, 7000)
    wait_listening(nat_vm, 7000)
    hns_sandbox.service.add_port_mapping(nat_vm.name, "tcp", 8080, 7000)
    result = curl(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:8080/", 10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hns_sandbox.outside_ip   # the VM sees the real client
    # the mapping opens its port only: the VM's own address stays closed
    assert curl(hns_sandbox.outside, f"http://{nat_vm.ip}:7000/").returncode != 0


def test_a_vm_of_one_network_cannot_reach_a_vm_of_another(
        hns_sandbox: Sandbox, make_vm: Callable[..., SandboxVm]) -> None:
    hns_sandbox.service.create_network("d1", "nat")
    hns_sandbox.service.create_network("d2", "nat")
    a, b = make_vm("a", "d1"), make_vm("b", "d2")
    serve_http_peer_echo(a, 7000)
    wait_listening(a, 7000)
    assert curl(b, f"http://{a.ip}:7000/").returncode != 0
    assert b.run(["ping", "-c", "2", "-W", "1", a.ip]).returncode != 0
    assert a.run(["ping", "-c", "2", "-W", "1", b.ip]).returncode != 0
    # both still reach the outside, and a VM of d1 reaches another VM of d1
    serve_http_peer_echo(hns_sandbox.outside, 8080)
    assert curl(b, f"http://{hns_sandbox.outside_ip}:8080/", 10).returncode == 0
    c = make_vm("c", "d1")
    assert curl(c, f"http://{a.ip}:7000/", 10).stdout.strip() == c.ip


def test_vm_to_another_networks_mapped_port_goes_through_the_host(
        hns_sandbox: Sandbox, make_vm: Callable[..., SandboxVm]) -> None:
    hns_sandbox.service.create_network("d1", "nat")
    hns_sandbox.service.create_network("d2", "nat")
    a, b = make_vm("a", "d1"), make_vm("b", "d2")
    serve_http_peer_echo(a, 7000)
    wait_listening(a, 7000)
    hns_sandbox.service.add_port_mapping("a", "tcp", 8080, 7000)
    # a published port is published to everyone, other networks included (Docker's rule)
    result = curl(b, f"http://{hns_sandbox.uplink_ip}:8080/", 10)
    assert result.returncode == 0, result.stderr


def test_firewall_off_lets_a_routed_peer_in(hns_sandbox: Sandbox,
                                            make_vm: Callable[..., SandboxVm]) -> None:
    result = hns_sandbox.hnsctl("--json", "network", "create", "open", "--type", "nat",
                                "--firewall", "off")
    assert result.returncode == 0, result.stderr
    net = json.loads(result.stdout)
    assert net["Firewall"] is False
    vm = make_vm("v", "open")
    route_subnet_through_host(hns_sandbox, net["Subnet"])
    serve_http_peer_echo(vm, 7000)
    wait_listening(vm, 7000)
    result = curl(hns_sandbox.outside, f"http://{vm.ip}:7000/", 10)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hns_sandbox.outside_ip


def test_isolation_is_in_our_table_only(hns_sandbox: Sandbox, nat_network: Any) -> None:
    tables = hns_sandbox.host.run(["nft", "list", "tables"]).stdout.split()
    ours = f"hns-{hns_sandbox.service.instance}"
    assert ours in tables
    text = hns_sandbox.host.run(["nft", "list", "table", "inet", ours]).stdout
    assert "hook forward priority filter - 10" in text
    assert f'oifname "{nat_network.bridge}" drop' in text


def _bridge_mac(sandbox: Sandbox, bridge: str) -> str:
    out = sandbox.host.run(["ip", "-j", "link", "show", bridge]).stdout
    return str(json.loads(out)[0]["address"])


def test_the_gateway_mac_is_fixed_and_survives_every_vm_delete(
        hns_sandbox: Sandbox, nat_network: Any, make_vm: Callable[..., SandboxVm]) -> None:
    vms = [make_vm(f"v{i}") for i in range(4)]
    mac = _bridge_mac(hns_sandbox, nat_network.bridge)
    assert mac.startswith("02:15:5d:")
    for vm in vms:   # every VM has the gateway in its neighbour table
        assert vm.run(["ping", "-c", "1", "-W", "5", vm.gateway]).returncode == 0
    lost: list[str] = []
    for i, victim in enumerate(vms[:-1]):
        others = vms[i + 1:]
        probes = [o.popen(["ping", "-i", "0.01", "-c", "150", "-W", "2", o.gateway],
                          stdout=-1, stderr=-1, text=True) for o in others]
        done = threading.Event()

        def delete(name: str = victim.name, done: threading.Event = done) -> None:
            hns_sandbox.service.delete_vm(name)
            done.set()
        threading.Timer(0.3, delete).start()
        for o, p in zip(others, probes, strict=True):
            out, _ = p.communicate(timeout=60)
            if " 0% packet loss" not in out:
                lost.append(f"{o.name} while deleting {victim.name}: {out.splitlines()[-2:]}")
        assert done.wait(30)
        hns_sandbox.vms.remove(victim)
        assert _bridge_mac(hns_sandbox, nat_network.bridge) == mac
    assert lost == []
