"""Bad input: exit 2, one line on stderr, nothing changed in the state or the kernel.
A failure half way: exit 1, nothing half-made left, the state unchanged."""

from __future__ import annotations

import subprocess

import pytest
from nsutil import bad_input_failures, snapshot

from hns.testing import Sandbox

BAD = [
    ("network", "create", "bad name!", "--type", "nat"),
    ("network", "create", "x" * 33, "--type", "nat"),
    ("network", "create", "_x", "--type", "nat"),
    ("network", "create", "n2", "--type", "bridge"),
    ("network", "create", "n2"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.50.0.0/33"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.50.0.1/24"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "8.8.8.0/24"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "fd00::/64"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.42.0.0/16"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.99.0.0/16"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.50.0.0/24",
     "--gateway", "10.51.0.1"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.50.0.0/24",
     "--gateway", "10.50.0.255"),
    ("network", "create", "n2", "--type", "nat", "--gateway", "10.50.0.1"),
    ("network", "create", "n2", "--type", "nat", "--mtu", "99"),
    ("network", "create", "n2", "--type", "nat", "--mtu", "big"),
    ("network", "create", "n", "--type", "nat"),
    ("network", "show", "nope"),
    ("network", "delete", "n"),
    ("network", "frobnicate"),
    ("vm", "create", "v", "--network", "n"),
    ("vm", "create", "v2", "--network", "nope"),
    ("vm", "create", "v2"),
    ("vm", "create", "v 2", "--network", "n"),
    ("vm", "create", "v2", "--network", "n", "--ip", "10.42.0.10"),
    ("vm", "create", "v2", "--network", "n", "--ip", "10.43.0.5"),
    ("vm", "create", "v2", "--network", "n", "--ip", "10.42.0.1"),
    ("vm", "create", "v2", "--network", "n", "--ip", "10.42.0.255"),
    ("vm", "create", "v2", "--network", "n", "--ip", "10.42.0"),
    ("vm", "create", "v2", "--network", "n", "--mac", "00:15:5d:zz:00:01"),
    ("vm", "create", "v2", "--network", "n", "--mac", "01:00:5e:00:00:01"),
    ("vm", "create", "v2", "--network", "n", "--mac", "00:15:5d:00:00:10"),
    ("vm", "show", "nope"),
    ("vm", "exec", "nope", "--", "true"),
    ("vm", "exec", "v"),
    ("vm", "list", "--network", "nope"),
    ("--host-netns", "no-such-namespace-here", "network", "list"),
    ("frobnicate",),
]


@pytest.fixture
def populated(hns_sandbox: Sandbox) -> Sandbox:
    hns_sandbox.host.run(["ip", "link", "add", "lan0", "type", "veth", "peer", "lan0p"],
                         check=True)
    hns_sandbox.host.run(["ip", "addr", "add", "10.99.0.1/24", "dev", "lan0"], check=True)
    hns_sandbox.service.create_network("n", "nat", subnet="10.42.0.0/24")
    hns_sandbox.vm("v", "n", ip="10.42.0.10", mac="00:15:5d:00:00:10")
    return hns_sandbox


def test_bad_input_exits_2_with_one_line_and_changes_nothing(populated: Sandbox) -> None:
    before = snapshot(populated)
    assert bad_input_failures(populated, BAD) == []
    assert snapshot(populated) == before


def test_kernel_failure_half_way_is_rolled_back(populated: Sandbox) -> None:
    net = populated.service.get_network("n")
    populated.host.run(["ip", "link", "del", net.bridge], check=True)  # the kernel lost it
    before = snapshot(populated)
    result = populated.hnsctl("vm", "create", "v2", "--network", "n")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "bridge" in result.stderr
    assert snapshot(populated) == before  # no netns, no veth, no state row
    ns = f"hns-{populated.service.instance}-v2"
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                    text=True).stdout
    populated.hnsctl("restore", check=True)
    assert populated.hnsctl("vm", "create", "v2", "--network", "n").returncode == 0


def test_twenty_concurrent_creates_get_distinct_addresses(hns_sandbox: Sandbox) -> None:
    hns_sandbox.service.create_network("n", "nat")
    procs = [subprocess.Popen(
        [*hns_sandbox.hnsctl_argv(), "--json", "vm", "create", f"c{i}", "--network", "n"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(20)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0] * 20, [err for _, _, err in results]
    vms = hns_sandbox.service.list_vms()
    assert len(vms) == 20
    assert len({v.ip for v in vms}) == 20 and len({v.mac for v in vms}) == 20
    last = vms[-1]
    ping = subprocess.run(["ip", "netns", "exec", last.netns, "ping", "-c1", "-W5",
                           str(vms[0].ip)], capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout
