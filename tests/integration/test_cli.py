"""hnsctl end to end: JSON shapes, vm exec, deletes that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess

from hns.testing import Sandbox


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_network_and_vm_json_shapes(hns_sandbox: Sandbox) -> None:
    net = json.loads(ok(hns_sandbox.hnsctl("--json", "network", "create", "n1", "--type", "nat",
                                           "--subnet", "10.42.0.0/24", "--mtu", "1400")))
    assert net["Name"] == "n1" and net["Type"] == "NAT" and net["Mtu"] == 1400
    assert net["Subnet"] == "10.42.0.0/24" and net["Gateway"] == "10.42.0.1"
    assert net["Ipams"] == [{"Type": "Static", "Subnets": [{
        "IpAddressPrefix": "10.42.0.0/24",
        "Routes": [{"NextHop": "10.42.0.1", "DestinationPrefix": "0.0.0.0/0"}]}]}]
    assert json.loads(ok(hns_sandbox.hnsctl("--json", "network", "show", "n1"))) == net
    assert json.loads(ok(hns_sandbox.hnsctl("--json", "network", "list"))) == [net]

    vm = json.loads(ok(hns_sandbox.hnsctl("--json", "vm", "create", "v1", "--network", "n1",
                                          "--ip", "10.42.0.77", "--mac", "00-15-5D-AA-BB-CC")))
    assert vm["IpAddress"] == "10.42.0.77" and vm["PrefixLength"] == 24
    assert vm["MacAddress"] == "00:15:5d:aa:bb:cc" and vm["InterfaceName"] == "eth0"
    assert vm["Network"] == "n1" and vm["Gateway"] == "10.42.0.1" and vm["ID"]
    assert json.loads(ok(hns_sandbox.hnsctl("vm", "show", "v1", "--json"))) == vm
    assert json.loads(ok(hns_sandbox.hnsctl("--json", "vm", "list"))) == [vm]
    ns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert vm["NetNs"] in ns_list
    link = hns_sandbox.host.run(["ip", "-o", "link", "show", net["Bridge"]]).stdout
    assert "mtu 1400" in link
    text = ok(hns_sandbox.hnsctl("vm", "list"))
    assert "v1" in text and "10.42.0.77/24" in text


def test_vm_exec_passes_exit_code_and_resolv_conf(hns_sandbox: Sandbox) -> None:
    resolv_dir = f"/etc/netns/{hns_sandbox.host_netns}"
    os.makedirs(resolv_dir)
    try:
        with open(f"{resolv_dir}/resolv.conf", "w") as f:
            f.write("nameserver 198.51.100.53\nnameserver 127.0.0.53\nsearch example.test\n")
        ok(hns_sandbox.hnsctl("network", "create", "n", "--type", "nat"))
        ok(hns_sandbox.hnsctl("vm", "create", "v", "--network", "n"))
    finally:
        os.remove(f"{resolv_dir}/resolv.conf")
        os.rmdir(resolv_dir)
    assert hns_sandbox.hnsctl("vm", "exec", "v", "--", "sh", "-c", "exit 7").returncode == 7
    resolv = ok(hns_sandbox.hnsctl("vm", "exec", "v", "--", "cat", "/etc/resolv.conf"))
    # the DNS proxy on the gateway first, then the host's non-loopback nameserver
    assert [line for line in resolv.splitlines() if line.startswith("nameserver")] == [
        "nameserver 172.16.0.1", "nameserver 198.51.100.53"]
    assert "search example.test" in resolv
    addr = ok(hns_sandbox.hnsctl("vm", "exec", "v", "--", "ip", "-4", "-o", "addr", "show",
                                 "eth0"))
    assert "172.16.0.2/20" in addr


def test_deletes_are_idempotent_and_leave_nothing(hns_sandbox: Sandbox) -> None:
    net = json.loads(ok(hns_sandbox.hnsctl("--json", "network", "create", "n", "--type",
                                           "nat")))
    vm = json.loads(ok(hns_sandbox.hnsctl("--json", "vm", "create", "v", "--network", "n")))
    server = hns_sandbox.hnsctl("vm", "exec", "v", "--", "sleep", "0")  # the VM runs things
    assert server.returncode == 0
    refused = hns_sandbox.hnsctl("network", "delete", "n")
    assert refused.returncode == 2 and "VMs attached" in refused.stderr
    ok(hns_sandbox.hnsctl("vm", "delete", "v"))
    again = hns_sandbox.hnsctl("vm", "delete", "v")
    assert again.returncode == 0 and "does not exist" in again.stderr
    ok(hns_sandbox.hnsctl("network", "delete", "n"))
    assert hns_sandbox.hnsctl("network", "delete", "n").returncode == 0

    links = ok(hns_sandbox.host.run(["ip", "-o", "link"]))
    assert net["Bridge"] not in links and vm["HostInterfaceName"] not in links
    assert vm["NetNs"] not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                             text=True).stdout
    assert not os.path.exists(f"/etc/netns/{vm['NetNs']}")
    assert "hns" not in ok(hns_sandbox.host.run(["nft", "list", "ruleset"]))
    assert json.loads(ok(hns_sandbox.hnsctl("--json", "vm", "list"))) == []


def test_network_delete_force_removes_its_vms(hns_sandbox: Sandbox) -> None:
    ok(hns_sandbox.hnsctl("network", "create", "n", "--type", "nat"))
    ok(hns_sandbox.hnsctl("vm", "create", "a", "--network", "n"))
    ok(hns_sandbox.hnsctl("vm", "create", "b", "--network", "n"))
    ok(hns_sandbox.hnsctl("network", "delete", "n", "--force"))
    assert json.loads(ok(hns_sandbox.hnsctl("--json", "vm", "list"))) == []
    assert hns_sandbox.service.gc(dry_run=True) == []


def test_vm_delete_powers_off_processes(hns_sandbox: Sandbox) -> None:
    ok(hns_sandbox.hnsctl("network", "create", "n", "--type", "nat"))
    vm = hns_sandbox.vm("v", "n")
    proc = vm.popen(["sleep", "600"])
    ok(hns_sandbox.hnsctl("vm", "delete", "v"))
    assert proc.wait(timeout=30) != 0
