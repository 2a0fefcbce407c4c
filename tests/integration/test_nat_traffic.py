"""Traffic through a NAT network: real clients (curl, socat, ping) in real namespaces."""

from __future__ import annotations

from collections.abc import Callable

from helpers.nsutil import serve_http_peer_echo, serve_udp_peer_echo, udp_ask, wait_listening

from hns.testing import Sandbox, SandboxVm


def test_tcp_to_outside_leaves_from_the_uplink_address(hns_sandbox: Sandbox,
                                                       nat_vm: SandboxVm) -> None:
    serve_http_peer_echo(hns_sandbox.outside, 8080)
    result = nat_vm.run(["curl", "-sS", "--max-time", "10",
                         f"http://{hns_sandbox.outside_ip}:8080/"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hns_sandbox.uplink_ip


def test_udp_to_outside_leaves_from_the_uplink_address(hns_sandbox: Sandbox,
                                                       nat_vm: SandboxVm) -> None:
    serve_udp_peer_echo(hns_sandbox.outside, 9053)
    seen = udp_ask(nat_vm, hns_sandbox.outside_ip, 9053)
    assert seen.split(":")[0] == hns_sandbox.uplink_ip


def test_ping_to_outside(hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    # the outside namespace has no route to the VM subnet: a reply proves the NAT
    result = nat_vm.run(["ping", "-c", "2", "-W", "5", hns_sandbox.outside_ip])
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0% packet loss" in result.stdout


def test_vm_reaches_its_gateway(hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    assert nat_vm.run(["ping", "-c", "1", "-W", "5", nat_vm.gateway]).returncode == 0
    serve_http_peer_echo(hns_sandbox.host, 8081, bind=nat_vm.gateway)
    result = nat_vm.run(["curl", "-sS", "--max-time", "10", f"http://{nat_vm.gateway}:8081/"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == nat_vm.ip  # no NAT towards the gateway


def test_two_vms_reach_each_other(make_vm: Callable[..., SandboxVm]) -> None:
    a, b = make_vm("a"), make_vm("b")
    assert a.ip != b.ip and a.mac != b.mac
    assert a.run(["ping", "-c", "1", "-W", "5", b.ip]).returncode == 0
    serve_http_peer_echo(b, 8000)
    result = a.run(["curl", "-sS", "--max-time", "10", f"http://{b.ip}:8000/"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == a.ip  # bridged, not masqueraded


def test_outside_cannot_reach_the_vm_directly(hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    nat_vm.popen(["socat", "TCP-LISTEN:7000,reuseaddr", "SYSTEM:echo hi"])
    wait_listening(nat_vm, 7000)
    result = hns_sandbox.outside.run(["curl", "-sS", "--max-time", "3",
                                      f"http://{nat_vm.ip}:7000/"])
    assert result.returncode != 0  # no route: a NAT network is not reachable from outside


def test_vm_interface_shape(nat_vm: SandboxVm, nat_network: object) -> None:
    link = nat_vm.run(["ip", "-o", "link", "show", "eth0"]).stdout
    assert nat_vm.mac in link and "mtu 1500" in link and "state UP" in link
    assert nat_vm.mac.startswith("00:15:5d:")
    route = nat_vm.run(["ip", "route", "show", "default"]).stdout
    assert f"default via {nat_vm.gateway} dev eth0" in route
    assert "state UNKNOWN" in nat_vm.run(["ip", "-o", "link", "show", "lo"]).stdout
