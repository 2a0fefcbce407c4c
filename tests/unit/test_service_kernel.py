"""The service against the in-memory kernel (hns.fake_kernel) and nft fake: what it
makes, removes, rebuilds and collects, asserted on the resulting kernel objects."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from hns import naming
from hns.errors import KernelError
from hns.fake_kernel import FakeKernel, FakeLink
from hns.service import Service
from nat.nft import FakeNft


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def svc(tmp_path: Path, kernel: FakeKernel) -> Iterator[Service]:
    with Service(tmp_path / "state", nft=FakeNft(), kernel=kernel) as service:
        yield service


def ours(svc: Service) -> str:
    return naming.instance_alias_prefix(svc.instance_id)


def test_a_network_and_a_vm_are_what_the_kernel_then_holds(svc: Service,
                                                           kernel: FakeKernel) -> None:
    net = svc.create_network("n", "nat", subnet="10.50.0.0/24")
    vm = svc.create_vm("v", "n")
    bridge = kernel.links[net.bridge]
    assert bridge.kind == "bridge" and bridge.mac == naming.bridge_mac(net.id)
    assert bridge.addresses == {"10.50.0.1/24"} and bridge.alias.startswith(ours(svc))
    veth = kernel.links[vm.host_ifname]
    assert (veth.kind, veth.master, veth.peer_netns) == ("veth", net.bridge, vm.netns)
    assert veth.alias == naming.link_alias(svc.instance_id, vm.id)
    ns = kernel.namespaces[vm.netns]
    assert ns.tag == veth.alias and ns.eth0_mac == vm.mac
    assert ns.config == ("nat", vm.ip, 24, IPv4Address("10.50.0.1"))
    assert kernel.resolv[vm.netns] == (IPv4Address("10.50.0.1"), svc.instance_id)
    assert kernel.forwarding == {4}


def test_deletes_leave_no_kernel_object(svc: Service, kernel: FakeKernel) -> None:
    svc.create_network("n", "nat")
    svc.create_vm("v", "n")
    svc.create_vm("w", "n")
    assert svc.delete_vm("v")
    assert sorted(kernel.namespaces) == [svc.get_vm("w").netns]
    assert svc.delete_network("n", force=True)
    assert kernel.links == {} and kernel.namespaces == {} and kernel.resolv == {}


def test_restore_after_a_reboot_makes_the_same_objects_again(svc: Service,
                                                             kernel: FakeKernel) -> None:
    svc.create_network("n", "nat")
    vm = svc.create_vm("v", "n")
    before = (dict(kernel.links), {k: (v.tag, v.eth0_mac, v.config)
                                   for k, v in kernel.namespaces.items()})
    kernel.reboot()
    made = svc.restore()
    assert len(made) == 2 and f"vm v ({vm.ip}, {vm.mac})" in made
    after = (dict(kernel.links), {k: (v.tag, v.eth0_mac, v.config)
                                  for k, v in kernel.namespaces.items()})
    assert after == before
    assert svc.restore() == []                  # nothing missing any more


def test_restore_makes_again_only_the_vm_whose_namespace_vanished(
        svc: Service, kernel: FakeKernel) -> None:
    svc.create_network("n", "nat")
    lost = svc.create_vm("lost", "n")
    svc.create_vm("kept", "n")
    kernel.lose_namespace(lost.netns)
    assert lost.host_ifname not in kernel.links     # the pair goes with its namespace
    assert svc.restore() == [f"vm lost ({lost.ip}, {lost.mac})"]
    assert kernel.namespaces[lost.netns].eth0_mac == lost.mac


def test_gc_removes_only_what_carries_this_instances_id(svc: Service,
                                                         kernel: FakeKernel) -> None:
    svc.create_network("n", "nat")
    vm = svc.create_vm("v", "n")
    prefix = naming.netns_prefix(svc.instance)
    # leftovers of this instance the state does not know ...
    kernel.create_netns(f"{prefix}gone")
    kernel.tag_netns(f"{prefix}gone", naming.link_alias(svc.instance_id, "x"))
    kernel.write_vm_resolv(f"{prefix}old", IPv4Address("10.0.0.1"), svc.instance_id)
    kernel.links["hvstale"] = FakeLink("veth", naming.link_alias(svc.instance_id, "y"))
    # ... and another instance's objects under the same tag
    other = "f" * 32
    kernel.create_netns(f"{prefix}theirs")
    kernel.tag_netns(f"{prefix}theirs", naming.link_alias(other, "z"))
    kernel.write_vm_resolv(f"{prefix}theirs2", IPv4Address("10.0.0.1"), other)
    assert sorted(svc.gc(dry_run=True)) == sorted([
        "link hvstale", f"netns {prefix}gone", f"resolv.conf /etc/netns/{prefix}old"])
    assert "hvstale" in kernel.links                # a dry run changes nothing
    svc.gc()
    assert sorted(kernel.namespaces) == sorted([vm.netns, f"{prefix}theirs"])
    assert sorted(kernel.resolv) == sorted([vm.netns, f"{prefix}theirs2"])
    assert svc.gc() == []


def test_a_kernel_failure_half_way_leaves_neither_row_nor_namespace(
        svc: Service, kernel: FakeKernel) -> None:
    net = svc.create_network("n", "nat")
    kernel.delete_link(net.bridge)                  # behind the service's back
    with pytest.raises(KernelError, match="does not exist"):
        svc.create_vm("v", "n")
    assert svc.list_vms() == [] and kernel.namespaces == {} and kernel.resolv == {}
