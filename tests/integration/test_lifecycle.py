"""up/down, subnet memory and collisions, restore after a reboot, gc (without the daemon
``up`` starts: it would heal the drift these tests make; test_service.py has it)."""

from __future__ import annotations

import json
import subprocess

from helpers.nsutil import serve_http_peer_echo

from hns import naming
from hns.testing import Sandbox


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def show(sandbox: Sandbox, kind: str, name: str) -> dict[str, object]:
    return dict(json.loads(ok(sandbox.hnsctl("--json", kind, "show", name))))


def test_up_is_idempotent_and_prints_how_to_get_a_shell(hns_sandbox: Sandbox) -> None:
    first = ok(hns_sandbox.hnsctl("up", "--no-daemon"))
    assert "172.16.0.2/20" in first and "gateway 172.16.0.1" in first
    assert "vm exec wsl -- bash" in first
    vm = show(hns_sandbox, "vm", "wsl")
    second = ok(hns_sandbox.hnsctl("up", "--no-daemon"))
    assert second == first
    assert show(hns_sandbox, "vm", "wsl") == vm
    assert len(json.loads(ok(hns_sandbox.hnsctl("--json", "vm", "list")))) == 1


def test_up_in_mirrored_mode_then_nat_after_down(hns_sandbox: Sandbox) -> None:
    out = ok(hns_sandbox.hnsctl("up", "--no-daemon", "--networking-mode", "mirrored"))
    assert "network WSL (mirrored, transit): 169.254.0.0/24" in out
    assert show(hns_sandbox, "network", "WSL")["Type"] == "Mirrored"
    vm_addrs = ok(hns_sandbox.hnsctl("vm", "exec", "wsl", "--", "ip", "-o", "addr"))
    assert f"{hns_sandbox.uplink_ip}/24" in vm_addrs          # the host's address
    before = ok(hns_sandbox.hnsctl("--json", "network", "list"))
    refused = hns_sandbox.hnsctl("up", "--no-daemon")      # nat: the other type
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("hnsctl: error: network WSL is mirrored, not nat: "
                                      "run 'hnsctl down' first")
    assert ok(hns_sandbox.hnsctl("--json", "network", "list")) == before
    ok(hns_sandbox.hnsctl("down"))
    out = ok(hns_sandbox.hnsctl("up", "--no-daemon"))
    assert "network WSL (NAT): 172.16.0.0/20" in out      # not the remembered transit /24


def test_up_refuses_an_unknown_mode(hns_sandbox: Sandbox) -> None:
    result = hns_sandbox.hnsctl("up", "--networking-mode", "bridged")
    assert result.returncode == 2
    assert "unknown network type 'bridged'" in result.stderr
    assert json.loads(ok(hns_sandbox.hnsctl("--json", "network", "list"))) == []


def test_down_then_up_gets_the_same_subnet(hns_sandbox: Sandbox) -> None:
    hns_sandbox.host.run(["ip", "addr", "add", "172.16.5.1/24", "dev", "lo"])  # not counted
    ok(hns_sandbox.host.run(["ip", "link", "add", "d0", "type", "veth", "peer", "d0p"]))
    ok(hns_sandbox.host.run(["ip", "addr", "add", "172.16.0.1/20", "dev", "d0"]))
    ok(hns_sandbox.hnsctl("up", "--no-daemon"))
    subnet = show(hns_sandbox, "network", "WSL")["Subnet"]
    assert subnet == "172.16.16.0/20"  # the first /20 free of the host's addresses
    ok(hns_sandbox.hnsctl("down"))
    assert json.loads(ok(hns_sandbox.hnsctl("--json", "network", "list"))) == []
    ok(hns_sandbox.hnsctl("up", "--no-daemon"))
    assert show(hns_sandbox, "network", "WSL")["Subnet"] == subnet


def test_remembered_subnet_colliding_gets_a_new_one_with_a_warning(hns_sandbox: Sandbox) -> None:
    ok(hns_sandbox.hnsctl("up", "--no-daemon"))
    old = show(hns_sandbox, "network", "WSL")["Subnet"]
    ok(hns_sandbox.hnsctl("down"))
    # a VPN comes up with a route over the remembered range
    ok(hns_sandbox.host.run(["ip", "link", "add", "vpn0", "type", "veth", "peer", "vpn0p"]))
    ok(hns_sandbox.host.run(["ip", "link", "set", "vpn0", "up"]))
    ok(hns_sandbox.host.run(["ip", "link", "set", "vpn0p", "up"]))
    ok(hns_sandbox.host.run(["ip", "route", "add", "172.16.0.0/16", "dev", "vpn0"]))
    result = hns_sandbox.hnsctl("up", "--no-daemon")
    assert result.returncode == 0, result.stderr
    new = show(hns_sandbox, "network", "WSL")["Subnet"]
    assert new != old and new == "172.17.0.0/20"
    assert "warning" in result.stderr and str(old) in result.stderr and str(new) in result.stderr
    vm = hns_sandbox.hnsctl("vm", "exec", "wsl", "--", "ping", "-c1", "-W5",
                            hns_sandbox.outside_ip)
    assert vm.returncode == 0


def _reboot(sandbox: Sandbox) -> None:
    """The kernel objects go, the state directory stays."""
    instance = sandbox.service.instance
    for vm in sandbox.service.list_vms():
        subprocess.run(["ip", "netns", "del", vm.netns], check=True)
    for net in sandbox.service.list_networks():
        ok(sandbox.host.run(["ip", "link", "del", net.bridge]))
    ok(sandbox.host.run(["nft", "delete", "table", "inet", naming.nft_table_name(instance)]))


def test_restore_after_reboot_keeps_addresses_and_macs(hns_sandbox: Sandbox) -> None:
    ok(hns_sandbox.hnsctl("up", "--no-daemon"))
    ok(hns_sandbox.hnsctl("vm", "create", "second", "--network", "WSL"))
    before = json.loads(ok(hns_sandbox.hnsctl("--json", "vm", "list")))
    _reboot(hns_sandbox)
    assert hns_sandbox.hnsctl("vm", "exec", "wsl", "--", "true").returncode == 1
    ok(hns_sandbox.hnsctl("up", "--no-daemon"))
    assert json.loads(ok(hns_sandbox.hnsctl("--json", "vm", "list"))) == before
    for vm in before:
        mac = ok(hns_sandbox.hnsctl("vm", "exec", vm["Name"], "--", "cat",
                                    "/sys/class/net/eth0/address")).strip()
        assert mac == vm["MacAddress"]
    serve_http_peer_echo(hns_sandbox.outside, 8080)
    seen = ok(hns_sandbox.hnsctl("vm", "exec", "second", "--", "curl", "-sS", "--max-time", "10",
                                 f"http://{hns_sandbox.outside_ip}:8080/"))
    assert seen.strip() == hns_sandbox.uplink_ip


def test_restore_command_reports_what_it_made(hns_sandbox: Sandbox) -> None:
    ok(hns_sandbox.hnsctl("up", "--no-daemon"))
    assert ok(hns_sandbox.hnsctl("restore")) == ""
    _reboot(hns_sandbox)
    made = ok(hns_sandbox.hnsctl("restore"))
    assert "bridge" in made and "vm wsl" in made


def test_gc_removes_tagged_objects_the_state_does_not_know(hns_sandbox: Sandbox) -> None:
    svc = hns_sandbox.service
    svc.create_network("n", "nat")
    vm = svc.create_vm("orphan", "n")
    keep = svc.create_vm("keep", "n")
    with svc.store.write() as tx:  # the state forgets the VM, the kernel does not
        tx.delete_vm(vm.id)
    listed = ok(hns_sandbox.hnsctl("gc", "--dry-run"))
    assert f"link {vm.host_ifname}" in listed and f"netns {vm.netns}" in listed
    assert keep.netns not in listed
    assert vm.netns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout
    ok(hns_sandbox.hnsctl("gc"))
    assert vm.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                          text=True).stdout
    assert vm.host_ifname not in ok(hns_sandbox.host.run(["ip", "-o", "link"]))
    assert ok(hns_sandbox.hnsctl("gc", "--dry-run")) == ""
    assert hns_sandbox.hnsctl("vm", "exec", "keep", "--", "true").returncode == 0
